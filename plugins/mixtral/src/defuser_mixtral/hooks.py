"""Mixtral.  Decorated experts (generic engine); before load, the legacy
``block_sparse_moe.experts.N.w1/w2/w3`` checkpoint keys load into
``mlp.experts.N.gate_proj/down_proj/up_proj`` instead of being fused."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="mixtral",
    description="Mistral AI: Mixtral, Mistral 4, Mistral Large 4",
    model_types=[
        TypeSupport("mistral4", min_transformers="5.24.0"),
        TypeSupport("mistral_large4", min_transformers="5.24.0"),
        TypeSupport("mistral_large4_text", notes="text model built alone", min_transformers="5.24.0"),
        TypeSupport("mixtral", notes="legacy block_sparse_moe w1/w2/w3 keys load"),
    ],
    # w1 is each expert's gate, w3 its up and w2 its down projection.
    legacy_projection_names={"mixtral": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
