"""Zyphra Zamba2, ZAYA: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="zyphra",
    description="Zyphra Zamba2, ZAYA",
    model_types=[
        TypeSupport("zamba2", notes="shared block's fused MLP split; adapters kept"),
        TypeSupport("zaya", min_transformers="5.24.0"),
    ],
)
