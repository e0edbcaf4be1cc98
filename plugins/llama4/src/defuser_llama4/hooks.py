"""Meta Llama 4: the model types this plugin claims, and what differs from the generic engine."""

from defuser.family import Family
from defuser.plugin_info import TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="llama4",
    description="Meta Llama 4",
    model_types=[
        TypeSupport(
            "llama4",
            preload=True,
            notes="undecorated experts; expert-major input, every token through every expert",
        ),
        TypeSupport("llama4_text", preload=True, notes="text model built alone"),
    ],
    # Undecorated: [E, H, 2I] / [E, I, H] storage, forward(hidden_states[E*T, H]).
    experts_classes={"Llama4TextExperts": {"is_transposed": True, "contract": "expert_major"}},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
