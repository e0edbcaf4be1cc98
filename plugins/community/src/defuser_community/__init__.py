"""defuser plugin: single-model families."""
