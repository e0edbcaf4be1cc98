"""defuser plugin: Qwen (Alibaba)."""
