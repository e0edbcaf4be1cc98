"""defuser plugin: Ai2 OLMoE, FlexOlmo."""
