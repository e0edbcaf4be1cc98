"""Google Gemma 4 MoE: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="gemma",
    description="Google Gemma 4 MoE",
    model_types=[
        TypeSupport(
            "diffusion_gemma",
            notes="experts in the decoder layer",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "diffusion_gemma_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "gemma4",
            notes="experts in the decoder layer (enable_moe_block)",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "gemma4_text",
            notes="experts in the decoder layer",
            min_transformers="5.24.0",
        ),
    ],
    tested_on=["5.24.0", "5.25.0"],
    tiny_models={
        # The canvas of tokens the decoder refines.
        "diffusion_gemma": TinyModel(config={"canvas_length": 8}, inputs="defuser_gemma.tiny_inputs:diffusion_inputs"),
    },
)
