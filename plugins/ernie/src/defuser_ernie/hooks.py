"""Baidu ERNIE 4.5 MoE: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="ernie",
    description="Baidu ERNIE 4.5 MoE",
    model_types=[
        TypeSupport("ernie4_5_moe"),
        TypeSupport(
            "ernie4_5_vl_moe",
            notes="text and vision expert sets of different sizes",
        ),
        TypeSupport(
            "ernie4_5_vl_moe_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # Its height and width rope sections must be equal: a rotary half of 6 splits [2, 2, 2].
        "ernie4_5_vl_moe_text": TinyModel(config={"head_dim": 12}, multimodal_rope=True),
    },
)
