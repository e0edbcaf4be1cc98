"""Moonshot AI: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="moonshot",
    description="Moonshot AI: Kimi K2.5, Kimi Linear",
    model_types=[
        TypeSupport("kimi_k25", notes="DeepSeek-V3 text model inside", min_transformers="5.24.0"),
        TypeSupport("kimi_linear", min_transformers="5.24.0"),
    ],
    tested_on=["5.24.0", "5.25.0"],
)
