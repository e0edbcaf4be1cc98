"""StepFun Step 3.5 / 3.7: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="step",
    description="StepFun Step 3.5 / 3.7",
    model_types=[
        TypeSupport(
            "step3p5",
            notes="Step 3.7 experts",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "step3p7",
            notes="own gate: activation clamped (per-layer limit); undecorated before 5.25.0",
            min_transformers="5.24.0",
        ),
    ],
    # Undecorated with its own gate function (clamp after the activation) before 5.25.0, which
    # decorates it (the flags and its own gate describe it there).
    experts_classes={"Step3p7Experts": {"gate_style": "module"}},
    tested_on=["5.24.0", "5.25.0"],
    tiny_models={
        # The composite model always builds a sliding-window mask.
        "step3p5": TinyModel(
            config={
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
                "num_sliding_attention_heads": 4,
            }
        ),
    },
)
