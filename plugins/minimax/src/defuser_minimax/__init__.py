"""defuser plugin: MiniMax."""
