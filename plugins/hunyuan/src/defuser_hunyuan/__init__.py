"""defuser plugin: Tencent Hunyuan."""
