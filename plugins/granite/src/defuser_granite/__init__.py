"""defuser plugin: IBM Granite MoE."""
