"""defuser plugin: Mistral AI."""
