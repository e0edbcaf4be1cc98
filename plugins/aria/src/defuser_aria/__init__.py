"""defuser plugin: Rhymes Aria."""
