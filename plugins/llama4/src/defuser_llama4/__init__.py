"""defuser plugin: Meta Llama 4."""
