"""Tencent Hunyuan: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="hunyuan",
    description="Tencent Hunyuan",
    model_types=[
        TypeSupport("hunyuan_v1_moe", preload=True),
        TypeSupport("hy_v3", preload=True, min_transformers="5.24.0"),
        TypeSupport(
            "hy_v4",
            preload=True,
            notes="clamped SwiGLU (own gate function)",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "hy_v4_vl",
            preload=True,
            notes="clamped SwiGLU",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "hy_v4_vl_text",
            preload=True,
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
