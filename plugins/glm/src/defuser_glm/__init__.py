"""defuser plugin: GLM (Zhipu AI)."""
