"""defuser plugin: DeepSeek."""
