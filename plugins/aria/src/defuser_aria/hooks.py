"""Rhymes Aria: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, ParallelLayout, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="aria",
    description="Rhymes Aria",
    model_types=[
        TypeSupport(
            "aria",
            notes="transposed experts; 5.3.0: grouped GEMM experts split",
        ),
        TypeSupport(
            "aria_text",
            notes="text model built alone",
        ),
    ],
    # transformers 5.3.0: fc1/fc2 grouped GEMMs store [E, in, out]; fc1 is the GLU input.
    parallel_classes={"AriaGroupedExpertsGemm": ParallelLayout(transposed=True, gated_paths=r"experts\.fc1$")},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
