"""IBM Granite MoE: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_KEPT, Family, ParallelLayout, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="granite",
    description="IBM Granite MoE",
    model_types=[
        TypeSupport(
            "granitemoe",
            notes="5.3.0: parallel experts as input_linear.N.linear / output_linear.N.linear",
        ),
        TypeSupport("granitemoe_swa", min_transformers="5.24.0"),
        TypeSupport(
            "granitemoehybrid",
            notes="shared MLP input_linear kept; 5.3.0: parallel experts (input_linear.N.linear)",
            dense=DENSE_KEPT,
        ),
        TypeSupport(
            "granitemoeshared",
            notes="shared MLP input_linear kept; 5.3.0: parallel experts (input_linear.N.linear)",
            dense=DENSE_KEPT,
        ),
    ],
    # The shared MLP fuses gate and up in one Linear named input_linear: kept (GPTQModel's
    # definitions quantize shared_mlp.input_linear).  transformers 5.3.0 stacks each projection
    # of all experts in one parallel-experts module.
    parallel_classes={
        name: ParallelLayout(gated_paths=r"block_sparse_moe\.input_linear$")
        for name in ("GraniteMoeParallelExperts", "GraniteMoeSharedParallelExperts", "GraniteMoeHybridParallelExperts")
    },
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # 5.3.0 leaves the layer kinds unset; newer releases read the legacy names as linear/full attention.
        "granitemoehybrid": TinyModel(config={"layer_types": ["mamba", "attention"]}),
    },
)
