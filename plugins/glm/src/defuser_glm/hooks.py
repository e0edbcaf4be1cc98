"""GLM families: decorated experts (GLM-4-MoE, GLM-4-MoE-Lite, GLM-4V-MoE) and dense MLPs
whose gate and up projections share one ``gate_up_proj`` Linear (GLM, GLM-4, GLM-4V)."""

from defuser.plugin import DENSE_SPLIT, DenseLayout, Family, TinyModel, TypeSupport

__all__ = ["plugin"]

_DENSE = DenseLayout(fused_name="gate_up_proj", gate_first=True)

plugin = Family(
    name="glm",
    description="GLM (Zhipu AI): GLM, GLM-4, GLM-4V, GLM-4.5/4.6 MoE, GLM-5-Next, GLM-Image, GLM-OCR",
    model_types=[
        TypeSupport("glm", notes="dense gate_up_proj split", dense=DENSE_SPLIT),
        TypeSupport("glm4", notes="dense gate_up_proj split", dense=DENSE_SPLIT),
        TypeSupport("glm46v", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm4_moe", notes="shared experts kept"),
        TypeSupport("glm4_moe_lite", notes="shared experts kept"),
        TypeSupport("glm4v", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm4v_moe", notes="shared experts kept"),
        TypeSupport("glm4v_moe_text", notes="text model built alone"),
        TypeSupport("glm4v_text", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm5_next", notes="clamped SwiGLU (own gate function)", min_transformers="5.24.0"),
        TypeSupport(
            "glm5_next_text",
            notes="clamped SwiGLU; text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("glm_image", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport(
            "glm_image_text",
            notes="dense text MLP split",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("glm_moe_dsa"),
        TypeSupport("glm_ocr", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport("glm_ocr_text", notes="dense text MLP split", dense=DENSE_SPLIT),
        TypeSupport(
            "glmga",
            notes="dense text MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("sarvam_moe", notes="GLM-4-MoE experts", min_transformers="5.24.0"),
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
