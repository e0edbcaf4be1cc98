"""StepFun Step 3.5 / 3.7: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="step",
    description="StepFun Step 3.5 / 3.7",
    model_types=[
        TypeSupport(
            "step3p5",
            preload=True,
            reload="replace_fused_blocks",
            notes="Step 3.7 experts",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "step3p7",
            preload=True,
            reload="replace_fused_blocks",
            notes="undecorated; activation clamped after (per-layer limit)",
            min_transformers="5.24.0",
        ),
    ],
    # Undecorated with its own gate function (clamp after the activation).
    experts_classes={"Step3p7Experts": {"gate_style": "module"}},
)
