"""OpenAI: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="gpt_oss",
    description="OpenAI: gpt-oss, privacy filter",
    model_types=[
        TypeSupport(
            "gpt_oss",
            notes="interleaved, transposed, biased gate-up; clamped GLU (own gate function)",
        ),
        TypeSupport(
            "openai_privacy_filter",
            notes="concatenated, transposed, biased gate-up; clamped GLU",
            min_transformers="5.24.0",
        ),
    ],
    # gate and up alternate along the last axis (transformers 5.3.0 does not record it).
    layout_overrides={"GptOssExperts": {"is_concatenated": False}},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
