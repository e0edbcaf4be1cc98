"""Inkling, Inkling 2: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="inkling",
    description="Inkling, Inkling 2",
    model_types=[
        TypeSupport(
            "inkling2",
            notes="float32 softcapped SwiGLU",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "inkling2_loop",
            notes="float32 softcapped SwiGLU",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "inkling2_loop_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "inkling2_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "inkling_mm_model",
            notes="shared experts split too",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "inkling_text",
            notes="shared experts (stacked, gamma-scaled) split too",
            min_transformers="5.24.0",
        ),
    ],
    # Shared experts: stacked gate/up/down, every token through each, scaled by gammas.
    experts_classes={"InklingSharedExperts": {"separate_gate_up": True, "contract": "weighted_all"}},
    tested_on=["5.24.0", "5.25.0"],
    tiny_models={
        # The vision tower plans one layer per patch-size prime factor; fewer layers than that make
        # it solve an assignment problem with scipy.  Patches of 2 x 2 x 2 plan 3 layers.
        "inkling_vision": TinyModel(config={"patch_size": 2, "temporal_patch_size": 2, "n_layers": 3}),
    },
)
