"""defuser plugin: Moonshot AI."""
