"""Qwen MoE families.  Every experts class here is decorated by transformers, so the generic
engine does the work; this plugin claims the types and enables pre-load patching."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="qwen",
    description=(
        "Qwen (Alibaba): Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE, Qwen3-VL-MoE, Qwen3-Omni-MoE, "
        "Qwen4-Exp"
    ),
    model_types=[
        TypeSupport("qwen2_moe", preload=True, notes="sigmoid-gated shared expert kept"),
        TypeSupport("qwen3_5_moe", preload=True),
        TypeSupport("qwen3_5_moe_text", preload=True, notes="text model built alone"),
        TypeSupport("qwen3_moe", preload=True),
        TypeSupport("qwen3_next", preload=True, notes="hybrid linear attention; shared expert kept"),
        TypeSupport("qwen3_omni_moe", preload=True, notes="thinker and talker experts"),
        TypeSupport("qwen3_omni_moe_talker", preload=True, reload="replace_fused_blocks", notes="talker sub-model"),
        TypeSupport(
            "qwen3_omni_moe_talker_text",
            preload=True,
            reload="replace_fused_blocks",
            notes="talker text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "qwen3_omni_moe_text",
            preload=True,
            notes="thinker text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("qwen3_omni_moe_thinker", preload=True, notes="thinker sub-model"),
        TypeSupport(
            "qwen3_vl_moe",
            preload=True,
            reload="replace_fused_blocks",
            notes="checkpoints store transposed fused experts",
        ),
        TypeSupport("qwen3_vl_moe_text", preload=True, reload="replace_fused_blocks", notes="text model built alone"),
        TypeSupport("qwen4_exp", preload=True, min_transformers="5.24.0"),
        TypeSupport("qwen4_exp_text", preload=True, notes="text model built alone", min_transformers="5.24.0"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
