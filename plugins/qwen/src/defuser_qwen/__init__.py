"""defuser plugin: the qwen model family."""
