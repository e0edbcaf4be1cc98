"""Amazon Ergo: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="amazon",
    description="Amazon: Ergo",
    model_types=[
        TypeSupport(
            "ergo",
            notes="not gated, transposed; per-expert RMSNorm after each route kept",
            min_transformers="5.25.0",
        ),
    ],
    # ErgoExperts derives from the decorated ErgoExpertProjections (not gated, transposed) and
    # overrides its forward: one row per route, then the norm of the route's expert
    # (post_expert_norm, weight [E, H], called with the expert ids), then the weighted sum.
    layout_overrides={"ErgoExperts": {"has_post_expert_norm": True, "post_expert_norm_by_expert": True}},
    tested_on=["5.25.0"],
)
