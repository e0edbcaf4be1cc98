"""defuser plugin: Google Gemma 4 MoE."""
