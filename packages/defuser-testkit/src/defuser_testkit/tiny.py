"""Tiny-model factories for plugin tests (they live in core, which the demo also uses)."""

from defuser.plugin import SHRINK, build_tiny_model, tiny_config, tiny_inputs

__all__ = ["SHRINK", "build_tiny_model", "tiny_config", "tiny_inputs"]
