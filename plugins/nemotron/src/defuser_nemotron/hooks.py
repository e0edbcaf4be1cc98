"""NVIDIA Nemotron-H: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="nemotron",
    description="NVIDIA Nemotron-H",
    model_types=[
        TypeSupport("nemo_speechlm", notes="non-gated experts", min_transformers="5.24.0"),
        TypeSupport("nemotron_h", notes="non-gated experts (up_proj, down_proj)"),
        TypeSupport("nemotron_h_omni", notes="non-gated experts", min_transformers="5.24.0"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
