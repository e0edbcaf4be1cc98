"""MiniMax: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_KEPT, Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="minimax",
    description="MiniMax: MiniMax, M2, M3-VL",
    model_types=[
        TypeSupport("minimax"),
        TypeSupport("minimax_m2"),
        TypeSupport(
            "minimax_m3_vl",
            notes="clamped (up + 1) GLU (own gate function); dense and shared MLPs keep gate_up_proj",
            min_transformers="5.24.0",
            dense=DENSE_KEPT,
        ),
        TypeSupport(
            "minimax_m3_vl_text",
            notes="text model built alone",
            min_transformers="5.24.0",
            dense=DENSE_KEPT,
        ),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
