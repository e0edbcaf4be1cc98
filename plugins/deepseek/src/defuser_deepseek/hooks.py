"""DeepSeek: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="deepseek",
    description="DeepSeek: V2, V3, V3.2, V4, OCR-2 (and models built on DeepSeek-V3 experts)",
    model_types=[
        TypeSupport("deepseek_ocr2", min_transformers="5.24.0"),
        TypeSupport(
            "deepseek_ocr2_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("deepseek_v2", notes="shared experts kept"),
        TypeSupport("deepseek_v3", notes="shared experts kept"),
        TypeSupport("deepseek_v32", min_transformers="5.24.0"),
        TypeSupport(
            "deepseek_v4",
            notes="gate and up clamped before the activation (own gate function)",
            min_transformers="5.24.0",
        ),
        TypeSupport("sarvam_mla", notes="DeepSeek-V3 experts", min_transformers="5.24.0"),
        TypeSupport("unlimited_ocr", notes="DeepSeek-style experts", min_transformers="5.24.0"),
        TypeSupport("unlimited_ocr_text", notes="text model built alone", min_transformers="5.24.0"),
    ],
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
