"""GLM families: decorated experts (GLM-4-MoE, GLM-4-MoE-Lite, GLM-4V-MoE) and dense MLPs
whose gate and up projections share one ``gate_up_proj`` Linear (GLM, GLM-4, GLM-4V)."""

from defuser.engine.candidates import DenseLayout
from defuser.family import Family
from defuser.plugin_info import DENSE_SPLIT, TinyModel, TypeSupport

__all__ = ["plugin"]

_DENSE = DenseLayout(fused_name="gate_up_proj", gate_first=True)

plugin = Family(
    name="glm",
    description="GLM (Zhipu AI): GLM, GLM-4, GLM-4V, GLM-4.5/4.6 MoE, GLM-5-Next, GLM-Image, GLM-OCR",
    model_types=[
        TypeSupport("glm", preload=True, notes="dense gate_up_proj split", dense=DENSE_SPLIT),
        TypeSupport("glm4", preload=True, notes="dense gate_up_proj split", dense=DENSE_SPLIT),
        TypeSupport("glm46v", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm4_moe", preload=True, notes="shared experts kept"),
        TypeSupport("glm4_moe_lite", preload=True, notes="shared experts kept"),
        TypeSupport("glm4v", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm4v_moe", preload=True, notes="shared experts kept"),
        TypeSupport("glm4v_moe_text", preload=True, notes="text model built alone"),
        TypeSupport("glm4v_text", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm5_next", preload=True, notes="clamped SwiGLU (own gate function)", min_transformers="5.24.0"),
        TypeSupport(
            "glm5_next_text",
            preload=True,
            notes="clamped SwiGLU; text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("glm_image", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport(
            "glm_image_text",
            preload=True,
            notes="dense text MLP split",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("glm_moe_dsa", preload=True),
        TypeSupport("glm_ocr", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm_ocr_text", preload=True, notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport(
            "glmga",
            preload=True,
            notes="dense text MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("sarvam_moe", preload=True, notes="GLM-4-MoE experts", min_transformers="5.24.0"),
    ],
    # Split where ModelCloud's Defuser splits them (GPTQModel's definitions name the halves).
    dense_classes={name: _DENSE for name in ("GlmMLP", "Glm4MLP", "Glm4vTextMLP", "GlmImageTextMLP", "GlmOcrTextMLP")},
    dense_key_patterns={"glm4v": ("mlp.gate_up_proj.weight",)},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # The image tokenizer's codebook and latent widths have names of their own.
        "glm_image_vqmodel": TinyModel(config={"embed_dim": 32, "num_embeddings": 64, "latent_channels": 32}),
        # Text models that read a default mrope_section when the config has none.
        "glm4v_text": TinyModel(multimodal_rope=True),
        "glm4v_moe_text": TinyModel(multimodal_rope=True),
        "glm46v_text": TinyModel(multimodal_rope=True),
        "glm_image_text": TinyModel(multimodal_rope=True),
        "glm_ocr_text": TinyModel(multimodal_rope=True),
    },
)
