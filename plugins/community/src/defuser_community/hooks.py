"""Single-model families: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_SPLIT, DenseLayout, Family, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="community",
    description=(
        "single-model families: Arcee, AXK, Bailing, Beam, Cohere, Dia, ESMFold2, EXAONE, Flint, Jamba, "
        "Kolibri, Laguna, Lara, LFM2, Mellum, MiMo, Muse Spark, Solar"
    ),
    model_types=[
        TypeSupport("afmoe", min_transformers="5.24.0"),
        TypeSupport("axk1", min_transformers="5.24.0"),
        TypeSupport("axk2", min_transformers="5.24.0"),
        TypeSupport(
            "bailing_hybrid",
            notes="own clamped gate from 5.25.0 (its gate function)",
            min_transformers="5.24.0",
        ),
        TypeSupport("beam", notes="float32 gate math (own gate function)", min_transformers="5.24.0"),
        TypeSupport("cohere2_moe", min_transformers="5.24.0"),
        TypeSupport(
            "dia",
            notes="dense MLPs of encoder and decoder split",
            dense=DENSE_SPLIT,
        ),
        TypeSupport(
            "dia_decoder",
            notes="dense MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport(
            "dia_encoder",
            notes="dense MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("exaone_moe"),
        TypeSupport("flint", min_transformers="5.24.0"),
        TypeSupport("jamba"),
        TypeSupport("kolibri1", min_transformers="5.24.0"),
        TypeSupport("laguna", min_transformers="5.24.0"),
        TypeSupport("lara_mini", min_transformers="5.24.0"),
        TypeSupport("lfm2_moe"),
        TypeSupport("mellum", min_transformers="5.24.0"),
        TypeSupport("mimo_v2_flash", min_transformers="5.24.0"),
        TypeSupport(
            "muse_spark",
            notes="post-expert norm kept",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "muse_spark_text",
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("solar_open"),
    ],
    # Split where ModelCloud's Defuser splits it (GPTQModel's definitions name the halves).
    dense_classes={"DiaMLP": DenseLayout()},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
