"""defuser plugin: Inkling, Inkling 2."""
