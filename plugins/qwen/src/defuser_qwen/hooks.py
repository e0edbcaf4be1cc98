"""Qwen MoE families.  Every experts class here is decorated by transformers, so the generic
engine does the work; this plugin claims the types and enables pre-load patching."""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from defuser.plugin import Family, TinyModel, TypeSupport

if TYPE_CHECKING:  # importing a plugin must not import torch
    from torch import nn

__all__ = ["plugin", "qwen3_omni_text_runtime"]


def _thinker_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.thinker(*args, **kwargs)


def qwen3_omni_text_runtime(model: nn.Module) -> list[str]:
    """Make a Qwen3-Omni-MoE model usable as a text model, as ModelCloud's Defuser does: its
    ``forward`` (which the stock class does not define) runs the thinker, and ``generate``
    defaults to ``return_audio=False``.  Instance attributes: other models are untouched."""
    if not hasattr(model, "thinker"):
        return []
    patched = []
    if "forward" not in type(model).__dict__ and "forward" not in model.__dict__:
        model.forward = types.MethodType(_thinker_forward, model)
        patched.append("forward")
    stock_generate = getattr(model, "generate", None)
    if callable(stock_generate) and "generate" not in model.__dict__:

        def generate(*args: Any, return_audio: bool | None = None, **kwargs: Any) -> Any:
            return stock_generate(*args, return_audio=bool(return_audio), **kwargs)

        model.generate = generate
        patched.append("generate")
    return patched


plugin = Family(
    name="qwen",
    description=(
        "Qwen (Alibaba): Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE, Qwen3-VL-MoE, Qwen3-Omni-MoE, Qwen4-Exp"
    ),
    model_types=[
        TypeSupport("qwen2_moe", notes="sigmoid-gated shared expert kept"),
        TypeSupport("qwen3_5_moe"),
        TypeSupport("qwen3_5_moe_text", notes="text model built alone"),
        TypeSupport("qwen3_moe"),
        TypeSupport("qwen3_next", notes="hybrid linear attention; shared expert kept"),
        TypeSupport(
            "qwen3_omni_moe",
            notes="thinker and talker experts; text forward and generate(return_audio=False)",
        ),
        TypeSupport("qwen3_omni_moe_talker", notes="talker sub-model"),
        TypeSupport(
            "qwen3_omni_moe_talker_text",
            notes="talker text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport(
            "qwen3_omni_moe_text",
            notes="thinker text model built alone",
            min_transformers="5.24.0",
        ),
        TypeSupport("qwen3_omni_moe_thinker", notes="thinker sub-model"),
        TypeSupport(
            "qwen3_vl_moe",
            notes="checkpoints store transposed fused experts",
        ),
        TypeSupport("qwen3_vl_moe_text", notes="text model built alone"),
        TypeSupport("qwen4_exp", min_transformers="5.24.0"),
        TypeSupport("qwen4_exp_text", notes="text model built alone", min_transformers="5.24.0"),
    ],
    model_patches={"qwen3_omni_moe": qwen3_omni_text_runtime},
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # The shipped default configs lack attributes their models read.
        "qwen3_omni_moe_talker_text": TinyModel(
            config={"shared_expert_intermediate_size": 16},
            embeds_only=True,  # the talker has no embed_tokens: it is fed embeddings
        ),
        "qwen3_omni_moe_thinker": TinyModel(config={"vision_start_token_id": 151_652}),
        "qwen3_omni_moe": TinyModel(config={"talker_config.spatial_merge_size": 2}),
        "qwen4_exp_text": TinyModel(
            config={
                "indexer_n_heads": 2,
                "indexer_kv_heads": 1,
                "indexer_head_dim": 8,
                "indexer_budget": 4,
                "indexer_compress_ratio": 2,
                "hc_lowrank": 8,
                "ple_embed_dim": 32,
            }
        ),
    },
)
