"""GLM families: decorated experts (GLM-4-MoE, GLM-4-MoE-Lite, GLM-4V-MoE) and dense MLPs
whose gate and up projections share one ``gate_up_proj`` Linear (GLM, GLM-4, GLM-4V)."""

from defuser.engine.candidates import DenseLayout
from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

_DENSE = DenseLayout(fused_name="gate_up_proj", gate_first=True)

plugin = Family(
    name="glm",
    description="GLM, GLM-4, GLM-4V, GLM-4-MoE, GLM-4-MoE-Lite, GLM-4V-MoE",
    model_types=[
        TypeSupport("glm", notes="dense gate_up_proj split"),
        TypeSupport("glm4", notes="dense gate_up_proj split"),
        TypeSupport("glm4_moe", preload=True, notes="shared experts kept"),
        TypeSupport("glm4_moe_lite", preload=True, notes="shared experts kept"),
        TypeSupport("glm4v", preload=True, notes="dense text MLP split"),
        TypeSupport("glm4v_text", notes="dense text MLP split"),
        TypeSupport("glm4v_moe", notes="shared experts kept"),
        TypeSupport("glm4v_moe_text", notes="text model built alone"),
    ],
    dense_classes={"GlmMLP": _DENSE, "Glm4MLP": _DENSE, "Glm4vTextMLP": _DENSE},
    dense_key_patterns={"glm4v": ("mlp.gate_up_proj.weight",)},
)
