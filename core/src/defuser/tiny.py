"""Tiny models from configs: random weights, a fixed seed, no download (demo and tests).

:func:`tiny_config` shrinks the default config of a model type (and every sub-config) to a
few thousand parameters while keeping its structure: several experts, top-k > 1, two
decoder layers, every layer sparse.  Generic rules (:data:`SHRINK` and the ``_fit_*``
helpers) do most of it; what a model type needs beyond them is the plugins' knowledge, in the
:class:`~defuser.plugin_info.TinyModel` recipes they declare (:func:`tiny_recipe`).
:func:`build_tiny_model` instantiates it with the first Auto class that fits, else with the
model class of the config's own modeling module, or with an explicit class.
:func:`tiny_inputs` makes inputs (token ids, or what a recipe's builder makes for models that
token ids cannot drive) and :func:`tiny_forward` runs a model on them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from defuser.plugin_info import TinyModel

logger = logging.getLogger(__name__)

__all__ = [
    "SHRINK",
    "TinyModelDependencyError",
    "build_tiny_model",
    "model_from_config",
    "tiny_config",
    "tiny_forward",
    "tiny_inputs",
    "tiny_model_like",
    "tiny_recipe",
]

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
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 8,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "moe_layer_start_index": 0,
    "moe_layer_interval": 1,
    "expert_layer_offset": 0,
    "expert_layer_period": 1,
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
    "linear_num_heads": 4,
    "linear_head_dim": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_dense_layers": 0,
    "enable_moe_block": True,
    "top_k_experts": 2,
    "moe_top_k": 2,
    "moe_topk": 2,
    "expert_ffn_hidden_size": 16,
    "zero_expert_num": 2,
    "ffn_hidden_size": 64,
    "shared_intermediate_size": 16,
    "shared_experts_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16,
    "share_expert_dim": 16,
    "index_n_heads": 4,
    "index_head_dim": 16,
    # whisper-style audio encoders (5.3.0 names them without an attribute_map)
    "d_model": 32,
    "encoder_layers": 2,
    "encoder_ffn_dim": 64,
    "encoder_attention_heads": 4,
    # encoder-decoder cross attention
    "cross_hidden_size": 32,
    "cross_num_attention_heads": 4,
    "cross_num_key_value_heads": 2,
    "cross_head_dim": 8,
    # mamba mixers: heads * head size == expand * hidden_size
    "mamba_n_heads": 8,
    "mamba_d_head": 8,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "n_groups": 1,
    # projectors, adapters and audio/vision stems of multimodal models
    "projector_hidden_size": 32,
    "projection_hidden_dim": 32,
    "projection_intermediate_size": 64,
    "text_hidden_size": 32,
    "thinker_hidden_size": 32,
    "output_dim": 32,
    "vision_hidden_size": 32,
    "audio_hidden_size": 32,
    "adapter_in_dim": 32,
    "adapter_input_size": 32,
    "adapter_out_dim": 32,
    "downsample_hidden_size": 8,
    "decoder_dim": 32,
    "ext_pw_out_channel": 32,
    "depthwise_separable_out_channel": 32,
    "nemo_conv_channels": 8,
    "mlp_dim": 64,
    "dense_intermediate_size": 64,
    "moe_hidden_size": 16,
    "o_lora_rank": 16,
    "projector_input_dim": 32,
    "projector_output_dim": 32,
    "vision_output_dim": 32,
    "unpadded_vocab_size": 128,
    "hidden_sizes": 32,
    "output_channels": 16,
    "downsample_channels": 32,
    # per-layer embeddings (gemma)
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
    # vision towers of multimodal models
    "depth": 1,
    "num_heads": 4,
    "out_hidden_size": 32,
}


_MISSING = object()


@functools.lru_cache(maxsize=1)
def _installed_recipes() -> dict[str, TinyModel]:
    # Every installed plugin's recipes, whatever plugins the active configuration loads: tiny
    # models of a type are the same whichever plugin defuses it.
    from importlib.metadata import entry_points

    from defuser.plugins import ENTRY_POINT_GROUP

    found: dict[str, TinyModel] = {}
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda point: point.name):
        try:
            info = entry_point.load().defuser_plugin_info()
        except Exception as error:  # the plugin manager reports a broken plugin; here it has no recipes
            logger.debug("tiny-model recipes of plugin %s unavailable: %s", entry_point.name, error)
            continue
        for model_type, recipe in getattr(info, "tiny_models", {}).items():
            found.setdefault(model_type, recipe)
    return found


def tiny_recipe(model_type: str) -> TinyModel:
    """The :class:`~defuser.plugin_info.TinyModel` recipe a plugin gives ``model_type``
    (a plugin registered by hand first, then the installed ones), or an empty one."""
    # Imported here: this module is also loaded by path, without defuser, by a test's stock
    # loader (which supplies its own tiny_recipe).
    from defuser.plugin_info import TinyModel
    from defuser.plugins import get_plugin_manager

    for loaded in list(get_plugin_manager().plugins.values()):
        recipe = getattr(loaded.info, "tiny_models", {}).get(model_type)
        if recipe is not None:
            return recipe
    return _installed_recipes().get(model_type) or TinyModel()


def _shrink(config: Any, overrides: dict[str, Any], seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    per_layer = _detach_per_layer(config)
    before = _own_values(config)
    recipe = tiny_recipe(getattr(config, "model_type", ""))
    forced = set(recipe.config) | set(overrides)
    # Forced values come last: a generic name that is an alias of a forced one
    # (``num_local_experts`` of ``num_experts``) must not overwrite it.
    generic = {name: value for name, value in SHRINK.items() if name not in forced}
    values = {**generic, **recipe.config, **overrides}
    for name, value in values.items():
        if "." in name:
            continue
        if hasattr(config, name) or name in forced:
            try:
                setattr(config, name, _like(getattr(config, name, None), value))
            except (AttributeError, TypeError, ValueError):
                continue
    _fit_layer_types(config)
    _fit_mlp_layer_types(config)
    _fit_per_layer_lists(config, before.get("num_hidden_layers"))
    _fit_token_ids(config)
    _fit_rope_sections(config)
    _fit_mla_dims(config)
    for value in list(vars(config).values()):
        if _is_config(value):
            _shrink(value, {}, seen)
    _rederive(config, before)
    _attach_per_layer(config, per_layer, before)
    for name, value in values.items():
        if "." in name:
            owner, _, attribute = name.rpartition(".")
            target = config
            for part in owner.split("."):
                target = getattr(target, part)
            setattr(target, attribute, value)


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def _own_values(config: Any) -> dict[str, Any]:
    return {
        name: copy.deepcopy(value)
        for name, value in vars(config).items()
        if not name.startswith("_") and not _is_config(value)
    }


def _rederive(config: Any, before: dict[str, Any]) -> None:
    # Configs derive some sizes once, in their constructor (zamba2's mamba_headdim, an audio conv
    # stem's output size, a projector's merged size from the text sub-config); a fresh config
    # built from the shrunk values and sub-configs recomputes them.
    now = _own_values(config)
    changed = {name for name, value in now.items() if before.get(name, _MISSING) != value}
    accepted = inspect.signature(type(config)).parameters
    kwargs = {name: copy.deepcopy(value) for name, value in vars(config).items() if name in accepted}
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the throwaway config's validation warnings are noise
    try:
        fresh = type(config)(**kwargs)
    except Exception:  # a config that refuses its own values keeps them as they are
        return
    finally:
        logging.set_verbosity(verbosity)
    for name, value in _own_values(fresh).items():
        if name in before and name not in changed and now[name] != value:
            try:
                setattr(config, name, value)
            except (AttributeError, TypeError, ValueError):
                continue


def _like(current: Any, value: Any) -> Any:
    # A size of 0 switches a part off (no shared expert); keep it off.
    if current == 0 and type(current) is int and type(value) is int:
        return current
    # A per-modality list of sizes ([text, vision]) stays a list, each entry shrunk.
    if isinstance(current, (list, tuple)) and current and all(type(v) is int for v in current) and type(value) is int:
        return type(current)([value] * len(current))
    return value


def _detach_per_layer(config: Any) -> tuple[dict[int, dict[str, Any]], list[str] | None] | None:
    # Heterogeneous configs (per_layer_config) refuse reads of per-layer attributes; shrink them as
    # homogeneous, then re-attach the per-layer values that no shrink rule sets.
    spec = vars(config).get("_heterogeneity_spec")
    if spec is None:
        return None
    layer_types = config._getattr_without_heterogeneous_validation("layer_types", None)
    config.per_layer_config = None
    return spec.per_layer_overrides, layer_types


def _attach_per_layer(
    config: Any, per_layer: tuple[dict[int, dict[str, Any]], list[str] | None] | None, released: dict[str, Any]
) -> None:
    if per_layer is None:
        return
    old_overrides, old_types = per_layer
    new_types = getattr(config, "layer_types", None)
    kept: dict[int, dict[str, Any]] = {}
    for layer in range(config.num_hidden_layers):
        # A new layer copies the first old layer of its kind (or the old layer at its index).
        kind = new_types[layer] if new_types else None
        source = old_types.index(kind) if old_types and kind in old_types else layer
        old = old_overrides.get(source, {})
        values = {k: v for k, v in old.items() if k not in SHRINK}
        values.update(_mla_head_of_layer(config, {**released, **old}, kind))
        if values:
            kept[layer] = values
    if kept:
        config.per_layer_config = kept


def _mla_head_of_layer(config: Any, released: dict[str, Any], kind: str | None) -> dict[str, Any]:
    # A layer whose released head size is the sum of its latent-attention parts (dots3's
    # sliding-window layers, unlike its other layers) keeps that sum when shrunk, and its rotary
    # share of the head follows (the config's validation checks the sum).
    parts = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")
    if not all(type(released.get(name)) is int for name in parts):
        return {}
    if released["head_dim"] != released["qk_nope_head_dim"] + released["qk_rope_head_dim"]:
        return {}
    nope, rope = (config._getattr_without_heterogeneous_validation(name, None) for name in parts[1:])
    if not (type(nope) is int and type(rope) is int):
        return {}
    rope_parameters = getattr(config, "rope_parameters", None)
    kind_rope = rope_parameters.get(kind) if isinstance(rope_parameters, dict) else None
    if isinstance(kind_rope, dict) and "partial_rotary_factor" in kind_rope:
        kind_rope["partial_rotary_factor"] = rope / (nope + rope)
    return {"head_dim": nope + rope}


# Hybrid layer kinds that hold the fused block (nemotron_h's moe, zamba2's hybrid).
_FUSED_KINDS = ("moe", "hybrid")


def _fit_layer_types(config: Any) -> None:
    # One layer per kind, cycling over the kinds; legacy kind names get the current ones.  Where only
    # some kinds hold the fused block, one comes first and comes back last (max_layers and filter
    # tests want fused blocks in layer 0 and in a later layer), so every kind gets a layer.
    for name in ("layer_types", "layers_block_type"):
        layer_types = getattr(config, name, None)
        if not (isinstance(layer_types, list) and layer_types):
            continue
        kinds = list(dict.fromkeys(_remap_legacy_layer_types(layer_types)))
        kinds.sort(key=lambda kind: kind not in _FUSED_KINDS)
        count = getattr(config, "num_hidden_layers", None)
        derived = isinstance(getattr(type(config), "num_hidden_layers", None), property)  # len(list), as nemotron_h
        if not isinstance(count, int) or derived:
            count = len(kinds)
        if len(kinds) > 1 and kinds[0] in _FUSED_KINDS:
            count = max(count, len(kinds) + 1)
            if not derived:
                config.num_hidden_layers = count
        try:
            setattr(config, name, [kinds[i % len(kinds)] for i in range(count)])
        except (AttributeError, TypeError, ValueError):
            continue


def _remap_legacy_layer_types(layer_types: list[str]) -> list[str]:
    try:  # newer transformers renamed kinds ("mamba" -> "linear_attention"); 5.3.0 has no remap
        from transformers.configuration_utils import remap_legacy_layer_types
    except ImportError:
        return layer_types
    return remap_legacy_layer_types(layer_types)


def _fit_mlp_layer_types(config: Any) -> None:
    # Every layer sparse, so layer 0 has experts (max_layers tests rely on it).  A declared but
    # unset list (the model indexes it anyway) means all sparse too.
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds is None and "mlp_layer_types" in vars(config):
        kinds = ["sparse"]
    if isinstance(kinds, list) and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.mlp_layer_types = (
            ["sparse"] * config.num_hidden_layers if "sparse" in kinds else kinds[: config.num_hidden_layers]
        )


def _fit_per_layer_lists(config: Any, released_layers: Any) -> None:
    # Per-layer lists keep the released model's depth, which the config's validation refuses
    # once the depth is shrunk.  Two kinds are refitted, each with its meaning kept: a list of a
    # shrunk size (laguna's ``num_attention_heads_per_layer``) gets the shrunk size per layer, and
    # the layer indices 0..N-1 (mistral_large4's ``kv_source_layers``: each layer its own source)
    # become 0..n-1.  Any other per-layer list is left as it is.
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return
    for name, value in list(vars(config).items()):
        if not isinstance(value, list) or not all(type(entry) is int for entry in value):
            continue
        size = getattr(config, name.removesuffix("_per_layer"), None) if name.endswith("_per_layer") else None
        if type(size) is int:
            setattr(config, name, [size] * layers)
        elif isinstance(released_layers, int) and value == list(range(released_layers)):
            setattr(config, name, list(range(layers)))


def _fit_token_ids(config: Any) -> None:
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    # CTC heads put the blank class last (nemo_speechlm's word timestamps).
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "blank_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(config, name, vocab - 1)
        elif isinstance(value, list):
            setattr(config, name, [v if v < vocab else vocab - 1 for v in value])


def _fit_mla_dims(config: Any) -> None:
    # Multi-head latent attention caches its derived head size at init; its keys have one head per
    # query head, and its rotary part is the whole (shrunk) head_dim.
    if not (
        hasattr(config, "qk_nope_head_dim") and (hasattr(config, "qk_head_dim") or hasattr(config, "kv_lora_rank"))
    ):
        return
    if hasattr(config, "qk_head_dim"):
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if hasattr(config, "head_dim"):
        config.head_dim = config.qk_rope_head_dim
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "partial_rotary_factor" in rope and getattr(config, "head_dim", None):
        rope["partial_rotary_factor"] = config.qk_rope_head_dim / config.head_dim


def _fit_rope_sections(config: Any) -> None:
    # Multimodal rope splits the rotary half-dimension into sections; rescale them.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return
    mrope = "mrope_section" in rope or "mrope_section" in (
        getattr(config, "ignore_keys_at_rope_validation", None) or ()
    )
    if not mrope and not tiny_recipe(getattr(config, "model_type", "")).multimodal_rope:
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


class TinyModelDependencyError(ImportError):
    """A tiny model needs a package that is not installed."""


def build_tiny_model(
    model_type: str,
    model_class: type[nn.Module] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """Build a tiny ``model_type`` model in eval mode with seeded random weights.

    Raises :class:`TinyModelDependencyError` (an ``ImportError``) naming the package when the model
    code imports one that is missing.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    try:
        with _uninitialized_as_nan():
            model = model_class(config) if model_class is not None else _instantiate(model_type, config)
    except ModuleNotFoundError as error:
        raise TinyModelDependencyError(
            f"building a tiny {model_type} model needs the package {error.name!r}, which is not installed",
            name=error.name,
        ) from error
    _init_uninitialized(model, getattr(config, "initializer_range", None) or 0.02)
    return model.to(dtype).eval()


def tiny_model_like(config: Any, seed: int = 0) -> nn.Module:
    """A tiny float32 CPU model in eval mode with the structure ``config`` describes: a shrunk
    copy of it (``config`` is not changed), seeded random weights.  The global random state
    is left as it was (the self-check builds these inside a user's conversion)."""
    shrunk = copy.deepcopy(config)
    _shrink(shrunk, {}, set())
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        with _uninitialized_as_nan():
            model = _instantiate(str(getattr(shrunk, "model_type", "?")), shrunk)
        _init_uninitialized(model, getattr(shrunk, "initializer_range", None) or 0.02)
    return model.float().eval()


def model_from_config(config: Any) -> nn.Module:
    """The model ``config`` describes (Auto class first, else its modeling module's class for
    that config), built under the caller's device context: ``torch.device("meta")`` costs nothing."""
    return _instantiate(str(getattr(config, "model_type", "?")), config)


def _instantiate(model_type: str, config: Any) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    last_error: Exception | None = None
    for auto in (AutoModelForCausalLM, AutoModel):
        # An unmapped config makes from_config import every model module for its error message.
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) not in mapping:
            continue
        try:
            return auto.from_config(config)
        except (ValueError, AttributeError) as error:  # 5.3.0 lacks some composite CausalLM mappings
            last_error = error
    model_class = _config_model_class(config)
    if model_class is None:
        raise ValueError(f"no Auto class builds {model_type}") from last_error
    return model_class(config)


@contextlib.contextmanager
def _uninitialized_as_nan() -> Iterator[None]:
    # Some models leave a parameter to torch.empty (Qwen3-Omni's talker experts): garbage that
    # differs run to run.  Deterministic mode fills fresh memory with NaN, so it can be found.
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _init_uninitialized(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and not parameter.is_meta and torch.isnan(parameter).any():
                parameter.normal_(0.0, std)


def _config_model_class(config: Any) -> type[nn.Module] | None:
    """The model class of the config's own modeling module whose ``config_class`` is the config's class.

    Sub-configs (a decoder, an audio encoder) have no Auto mapping but a model class next to the
    composite one.  Prefer a class named after the config (``DiaDecoderConfig`` -> ``DiaDecoder``,
    ``...Model``, ``...ForCausalLM``), then any head on it (``...For...``), then the rest; 5.3.0
    lets sub-part classes inherit the composite's config_class, so a bare name match alone misleads.
    """
    import importlib

    from transformers import PreTrainedModel

    module_name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    stem = type(config).__name__.removesuffix("Config")
    candidates = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, PreTrainedModel)
        and value.__module__ == module.__name__
        and getattr(value, "config_class", None) is type(config)
        and "PreTrained" not in value.__name__
    ]

    def rank(cls: type) -> tuple[int, int, str]:
        name = cls.__name__
        rest = name[len(stem) :] if name.startswith(stem) else None
        named = 0 if rest in ("ForCausalLM", "Model", "") else 1 if rest is not None and rest.startswith("For") else 2
        kind = 0 if name.endswith("ForCausalLM") else 1 if name.endswith("Model") else 2
        return (named, kind, name)

    return min(candidates, key=rank, default=None)


def tiny_inputs(model: nn.Module, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, Any]:
    """Random inputs for a tiny model: ``input_ids`` and an attention mask, or what the
    ``inputs`` builder of its plugin's :class:`~defuser.plugin_info.TinyModel` recipe makes for
    a model that token ids alone cannot drive."""
    generator = torch.Generator().manual_seed(seed)
    recipe = tiny_recipe(getattr(model.config, "model_type", ""))
    if recipe.inputs:
        module_name, _, function = recipe.inputs.partition(":")
        builder = getattr(importlib.import_module(module_name), function)
        return builder(model, batch, length, generator)
    vocab = getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def tiny_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Run ``model`` on ``inputs`` without a cache; logits, else the last hidden state, else the first tensor.

    The run is seeded (on a forked generator), so repeated calls agree even for forwards that sample.

    A composite without a forward of its own (Qwen3-Omni-MoE: thinker, talker and code2wav run one
    after another in ``generate``) runs its first sub-model that has one: the thinker, which holds
    the fused experts.
    """
    kwargs = dict(inputs)
    if type(model).forward is nn.Module.forward:
        model = next((child for child in model.children() if type(child).forward is not nn.Module.forward), model)
    config = getattr(model, "config", None)
    if tiny_recipe(getattr(config, "model_type", "")).embeds_only and "input_ids" in kwargs:
        kwargs["inputs_embeds"] = model.get_input_embeddings()(kwargs.pop("input_ids"))
    # Hybrid (mamba) models choke on a cache built for a plain forward.  Heads pass use_cache through
    # **kwargs; a config with use_cache marks a model that takes it.
    parameters = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if "use_cache" in parameters or (takes_kwargs and hasattr(config, "use_cache")):
        kwargs.setdefault("use_cache", False)
    # Seeded on a forked generator: some forwards sample (esmfold2 draws its initial pair state).
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        output = model(**kwargs)
    return _main_tensor(output)


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise TypeError(f"no tensor in the output {type(output).__name__}")
