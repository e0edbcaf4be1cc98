"""Single-model families: the model types this plugin claims, and what differs from the generic engine."""

from defuser.engine.candidates import DenseLayout
from defuser.family import Family
from defuser.plugin_info import DENSE_SPLIT, TypeSupport

__all__ = ["plugin"]

plugin = Family(
    name="community",
    description=(
        "single-model families: Arcee, AXK, Bailing, Beam, Cohere, Dia, ESMFold2, EXAONE, Flint, Jamba, "
        "Kolibri, Laguna, Lara, LFM2, Mellum, MiMo, Muse Spark, Solar"
    ),
    model_types=[
        TypeSupport("afmoe", preload=True, min_transformers="5.24.0"),
        TypeSupport("axk1", preload=True, min_transformers="5.24.0"),
        TypeSupport("axk2", preload=True, min_transformers="5.24.0"),
        TypeSupport(
            "bailing_hybrid",
            preload=True,
            notes="own clamped gate from 5.25.0 (its gate function)",
            min_transformers="5.24.0",
        ),
        TypeSupport("beam", preload=True, notes="float32 gate math (own gate function)", min_transformers="5.24.0"),
        TypeSupport("cohere2_moe", preload=True, min_transformers="5.24.0"),
        TypeSupport(
            "dia",
            preload=True,
            notes="dense MLPs of encoder and decoder split",
            dense=DENSE_SPLIT,
        ),
        TypeSupport(
            "dia_decoder",
            preload=True,
            notes="dense MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport(
            "dia_encoder",
            preload=True,
            notes="dense MLP split",
            min_transformers="5.24.0",
            dense=DENSE_SPLIT,
        ),
        TypeSupport("exaone_moe", preload=True),
        TypeSupport("flint", preload=True, min_transformers="5.24.0"),
        TypeSupport("jamba", preload=True),
        TypeSupport("kolibri1", preload=True, min_transformers="5.24.0"),
        TypeSupport("laguna", preload=True, min_transformers="5.24.0"),
        TypeSupport("lara_mini", preload=True, min_transformers="5.24.0"),
        TypeSupport("lfm2_moe", preload=True),
        TypeSupport("mellum", preload=True, min_transformers="5.24.0"),
        TypeSupport("mimo_v2_flash", preload=True, min_transformers="5.24.0"),
        TypeSupport(
            "muse_spark",
            preload=True,
            notes="post-expert norm kept",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "muse_spark_text",
            preload=True,
            notes="text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("solar_open", preload=True),
    ],
    # Split where ModelCloud's Defuser splits it (GPTQModel's definitions name the halves).
    dense_classes={"DiaMLP": DenseLayout()},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
)
