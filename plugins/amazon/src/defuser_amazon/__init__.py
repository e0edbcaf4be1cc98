"""defuser plugin: Amazon."""
