"""Zyphra Zamba2, ZAYA: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="zyphra",
    description="Zyphra Zamba2, ZAYA",
    model_types=[
        TypeSupport(
            "zamba2",
            preload=True,
            reload="replace_fused_blocks",
            notes="shared block's fused MLP split; adapters kept",
        ),
        TypeSupport("zaya", preload=True, reload="replace_fused_blocks", min_transformers="5.24.0"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
