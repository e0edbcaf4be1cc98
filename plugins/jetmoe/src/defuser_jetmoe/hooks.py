"""JetMoE: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, ParallelLayout, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="jetmoe",
    description="JetMoE",
    model_types=[
        TypeSupport(
            "jetmoe",
            notes="parallel experts (MLP and attention MoA) as input_linear.N.linear, output_linear.N.linear",
        ),
    ],
    # The MLP's input projection is a GLU (gate and up halves); the MoA projections are not.
    parallel_classes={"JetMoeParallelExperts": ParallelLayout(gated_paths=r"\.mlp\.input_linear$")},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
