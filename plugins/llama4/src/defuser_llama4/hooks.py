"""Meta Llama 4: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="llama4",
    description="Meta Llama 4",
    model_types=[
        TypeSupport(
            "llama4",
            notes="undecorated experts; expert-major input, every token through every expert",
        ),
        TypeSupport("llama4_text", notes="text model built alone"),
    ],
    # Undecorated: [E, H, 2I] / [E, I, H] storage, forward(hidden_states[E*T, H]).
    experts_classes={"Llama4TextExperts": {"is_transposed": True, "contract": "expert_major"}},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
