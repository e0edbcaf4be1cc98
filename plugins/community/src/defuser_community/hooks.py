"""Single-model families: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import DENSE_SPLIT, DenseLayout, Family, TinyModel, TypeSupport

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
    tiny_models={
        # Optional parts that the default leaves unset but the model always builds.
        "lfm2_moe": TinyModel(config={"layer_types": ["conv", "full_attention"]}),
        # The audio tower's layers are its four downsampling stages, each listed in
        # patch_sizes / hidden_sizes / depths: all four kept.
        "muse_spark_audio": TinyModel(config={"num_hidden_layers": 4}),
        "dia": TinyModel(inputs="defuser_community.tiny_inputs:dia_inputs"),
        "dia_decoder": TinyModel(inputs="defuser_community.tiny_inputs:dia_decoder_inputs"),
        # Trunk widths the generic names miss; the single inputs are the atom encoder output plus
        # the residue features (2 * 33 + 1); 3 spatial + 1 uid rotary pairs fill the 4 rotary pairs
        # of an 8-wide head.
        "esmfold2": TinyModel(
            config={
                "pairwise_hidden_size": 16,
                "pair_transition_intermediate_size": 32,
                "folding_trunk_num_hidden_layers": 2,
                "num_loops": 1,
                "single_inputs_size": 32 + 67,
                "atom_encoder.output_dim": 32,
                "structure_head.diffusion_module.atom_encoder.output_dim": 32,
                "atom_encoder.num_spatial_rope_pairs_per_axis": 1,
                "atom_encoder.num_uid_rope_pairs": 1,
                "structure_head.diffusion_module.atom_encoder.num_spatial_rope_pairs_per_axis": 1,
                "structure_head.diffusion_module.atom_encoder.num_uid_rope_pairs": 1,
            },
            inputs="defuser_community.tiny_inputs:esmfold2_inputs",
        ),
        # NVFP4 fake quantisation of K/V works on blocks of 16: the head must be a multiple of 16.
        # Of the two layers, the indexed-attention one (1) indexes, with as many heads as a key
        # head serves, and reads its own K/V.
        "kolibri1_1": TinyModel(
            config={"head_dim": 16, "index_layers": [1], "kv_source_layers": [0, 1], "index_num_heads": 2}
        ),
    },
)
