"""Ai2 OLMoE, FlexOlmo: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="allenai",
    description="Ai2 OLMoE, FlexOlmo",
    model_types=[
        TypeSupport("flex_olmo", preload=True),
        TypeSupport("olmoe", preload=True),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
