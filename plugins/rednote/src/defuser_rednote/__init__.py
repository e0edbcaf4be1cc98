"""defuser plugin: rednote dots."""
