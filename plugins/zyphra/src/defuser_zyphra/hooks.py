"""Zyphra Zamba2, ZAYA: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_SPLIT, DenseLayout, Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="zyphra",
    description="Zyphra Zamba2, ZAYA",
    model_types=[
        TypeSupport(
            "zamba2",
            notes="shared block's fused MLP split; adapters kept",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("zaya", min_transformers="5.24.0"),
    ],
    # Split where ModelCloud's Defuser splits it (the adapters add to each half).
    dense_classes={"Zamba2MLP": DenseLayout()},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # 5.3.0's model always applies the shared-block rotary embedding.
        "zamba2": TinyModel(config={"use_mem_rope": True}),
        # ZAYA's config refuses any other top-k (validate_architecture, 5.25.0).
        "zaya": TinyModel(config={"num_experts_per_tok": 1}),
    },
)
