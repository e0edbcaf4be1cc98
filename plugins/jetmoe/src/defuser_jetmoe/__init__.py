"""defuser plugin: JetMoE."""
