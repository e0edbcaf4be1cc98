"""rednote dots: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_KEPT, Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="rednote",
    description="rednote dots: dots.llm1, dots3-note",
    model_types=[
        TypeSupport("dots1"),
        TypeSupport(
            "dots3_note",
            notes="vision experts vary per layer; audio MLP gate-up kept as one Linear",
            min_transformers="5.24.0",
            dense=DENSE_KEPT,
        ),
        TypeSupport("dots3_note_text", notes="text model built alone", min_transformers="5.24.0"),
        TypeSupport(
            "dots3_note_vision_encoder",
            notes="expert count varies per layer",
            min_transformers="5.24.0",
        ),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        "dots3_note_audio_encoder": TinyModel(inputs="defuser_rednote.tiny_inputs:dots3_audio_inputs"),
        "dots3_note_vision_encoder": TinyModel(inputs="defuser_rednote.tiny_inputs:vision_patch_inputs"),
    },
)
