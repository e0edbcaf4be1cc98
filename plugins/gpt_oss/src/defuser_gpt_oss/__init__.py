"""defuser plugin: OpenAI."""
