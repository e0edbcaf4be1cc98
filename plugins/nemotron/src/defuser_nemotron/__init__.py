"""defuser plugin: NVIDIA Nemotron-H."""
