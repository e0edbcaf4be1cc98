"""NVIDIA Nemotron-H: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="nemotron",
    description="NVIDIA Nemotron-H",
    model_types=[
        TypeSupport("nemo_speechlm", notes="non-gated experts", min_transformers="5.24.0"),
        TypeSupport("nemotron_h", notes="non-gated experts (up_proj, down_proj)"),
        TypeSupport("nemotron_h_omni", notes="non-gated experts", min_transformers="5.24.0"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # transformers' reverse conversion of the speech towers splits grouped-query q/k/v
        # projections evenly, so a tiny model with fewer key-value heads does not reload in
        # stock transformers either (5.25.0): equal heads.
        "nemo_speechlm": TinyModel(
            config={
                "audio_config.asr_config.num_key_value_heads": 4,
                "audio_config.diarization_config.audio_config.num_key_value_heads": 4,
                "word_timestamp_config.num_key_value_heads": 4,
            }
        ),
    },
)
