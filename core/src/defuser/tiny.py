"""Tiny models from configs: random weights, a fixed seed, no download (demo and tests).

:func:`tiny_config` shrinks the default config of a model type (and every sub-config) to a
few thousand parameters while keeping its structure: several experts, top-k > 1, two
decoder layers.  :func:`build_tiny_model` instantiates it with the first Auto class that
fits, or with an explicit class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SHRINK", "build_tiny_model", "tiny_config", "tiny_inputs"]

# Attribute -> small value; applied wherever a config (or sub-config) has the attribute.
SHRINK: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "max_position_embeddings": 128,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    # vision towers of multimodal models
    "depth": 1,
    "num_heads": 4,
    "out_hidden_size": 32,
}


def _shrink(config: Any, overrides: dict[str, Any], seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in {**SHRINK, **overrides}.items():
        if hasattr(config, name) or name in overrides:
            try:
                setattr(config, name, value)
            except (AttributeError, TypeError, ValueError):
                continue
    _fit_layer_types(config)
    _fit_mlp_layer_types(config)
    _fit_token_ids(config)
    _fit_rope_sections(config)
    _fit_mla_dims(config)
    for name in list(vars(config)):
        value = getattr(config, name, None)
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value, {}, seen)


def _fit_layer_types(config: Any) -> None:
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types and isinstance(getattr(config, "num_hidden_layers", None), int):
        kinds = list(dict.fromkeys(layer_types))
        try:
            config.layer_types = [kinds[i % len(kinds)] for i in range(config.num_hidden_layers)]
        except (AttributeError, TypeError, ValueError):
            pass


def _fit_mlp_layer_types(config: Any) -> None:
    # Every layer sparse, so layer 0 has experts (max_layers tests rely on it).
    kinds = getattr(config, "mlp_layer_types", None)
    if isinstance(kinds, list) and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.mlp_layer_types = (
            ["sparse"] * config.num_hidden_layers if "sparse" in kinds else kinds[: config.num_hidden_layers]
        )


def _fit_token_ids(config: Any) -> None:
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, name, vocab - 1)
        elif isinstance(value, list):
            setattr(config, name, [v if v < vocab else vocab - 1 for v in value])


# Text configs whose model reads a default mrope_section when the config has none.
_MROPE_BY_DEFAULT = {"glm4v_text", "glm4v_moe_text", "glm46v_text"}


def _fit_mla_dims(config: Any) -> None:
    # Multi-head latent attention caches its derived head size at init.
    if hasattr(config, "qk_head_dim") and hasattr(config, "qk_nope_head_dim"):
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        if hasattr(config, "head_dim"):
            config.head_dim = config.qk_rope_head_dim
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = config.num_attention_heads


def _fit_rope_sections(config: Any) -> None:
    # Multimodal rope splits the rotary half-dimension into sections; rescale them.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return
    if "mrope_section" not in rope and getattr(config, "model_type", "") not in _MROPE_BY_DEFAULT:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    half = rotary // 2
    sections = len(rope.get("mrope_section", (0, 0, 0)))
    base = [half // sections] * sections
    base[0] += half - sum(base)
    rope["mrope_section"] = base


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The default config of ``model_type``, shrunk (``overrides`` win)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config, overrides, set())
    return config


def build_tiny_model(
    model_type: str,
    model_class: type[nn.Module] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """Build a tiny ``model_type`` model in eval mode with seeded random weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    if model_class is not None:
        model = model_class(config)
    else:
        last_error: Exception | None = None
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                model = auto.from_config(config)
                break
            except (ValueError, AttributeError) as error:  # 5.3.0 lacks some composite CausalLM mappings
                last_error = error
        else:
            raise ValueError(f"no Auto class builds {model_type}") from last_error
    return model.to(dtype).eval()


def tiny_inputs(model: nn.Module, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` (and an attention mask) for a tiny text model."""
    generator = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
