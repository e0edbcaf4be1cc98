"""Tencent Hunyuan: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="hunyuan",
    description="Tencent Hunyuan",
    model_types=[
        TypeSupport("hunyuan_v1_moe"),
        TypeSupport("hy_v3", min_transformers="5.24.0"),
        TypeSupport(
            "hy_v4",
            notes="clamped SwiGLU (own gate function)",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "hy_v4_vl",
            notes="clamped SwiGLU",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "hy_v4_vl_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
