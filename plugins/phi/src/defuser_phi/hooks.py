"""Microsoft Phi: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_SPLIT, DenseLayout, Family, TinyModel, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="phi",
    description="Microsoft Phi: Phi-3, Phi-4-multimodal, PhiMoE",
    model_types=[
        TypeSupport("phi3", notes="dense gate_up_proj split", dense=DENSE_SPLIT),
        TypeSupport(
            "phi4_multimodal",
            notes="dense MLPs split; audio MLP halves reversed (up first)",
            dense=DENSE_SPLIT,
        ),
        TypeSupport(
            "phi4_multimodal_audio",
            notes="audio MLP halves reversed (up first)",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("phimoe"),
    ],
    # Split where ModelCloud's Defuser splits them; the audio conformer's MLP puts the up half first.
    dense_classes={
        "Phi3MLP": DenseLayout(),
        "Phi4MultimodalMLP": DenseLayout(),
        "Phi4MultimodalAudioMLP": DenseLayout(gate_first=False),
    },
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # Its conformer stack counts blocks, not layers.
        "phi4_multimodal_audio": TinyModel(
            config={"num_blocks": 2}, inputs="defuser_phi.tiny_inputs:phi4_audio_inputs"
        ),
    },
)
