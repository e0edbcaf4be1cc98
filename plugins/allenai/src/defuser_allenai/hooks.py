"""Ai2 OLMoE, FlexOlmo: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="allenai",
    description="Ai2 OLMoE, FlexOlmo",
    model_types=[
        TypeSupport("flex_olmo"),
        TypeSupport("olmoe"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
