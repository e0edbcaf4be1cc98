"""Rewriting transformers' checkpoint conversion mappings for patched model types.

For every model type and class name a plan names, ``register_checkpoint_conversion_mapping``
gets the stock mapping rewritten: the stock transforms that fuse per-expert (or per-half)
checkpoint keys are dropped, so those keys load as they are, and their per-expert names become
renamings (``experts.N.w1`` loads as ``experts.N.gate_proj``, and saves back as ``w1``);
transforms that reorder a fused checkpoint tensor keep their operations and then split it;
fused tensors and fused dense Linears are split per expert with each module's own layout
(:mod:`defuser.engine.checkpoint`).  A fused key that stock renamings turn into no key of the
model goes to the splits under its own name, as transformers loads it into the fused model.
"""

from __future__ import annotations

import re
from typing import Any

from defuser._hf import converter_patterns, forget_checkpoint_conversion_mapping, set_unrenamed_key_fallback
from defuser.engine.parallel_preload import parallel_converters
from defuser.engine.preload.plan import PreloadPlan
from defuser.engine.preload.state import PATCHES, ActivePatch

__all__ = ["install_mappings", "mapping_keys"]


def install_mappings(keys: set[str]) -> None:
    """Register, for each mapping key, the stock mapping patched for every active plan naming it
    (the stock mapping itself when none does)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for key in sorted(keys):
        owners = [active for active in PATCHES.active.values() if key in mapping_keys(active.plan)]
        if key not in PATCHES.stock_mappings:
            PATCHES.stock_mappings[key] = get_checkpoint_conversion_mapping(key)
        stock = PATCHES.stock_mappings[key]
        if not owners:
            _register_stock(key, stock)
            del PATCHES.stock_mappings[key]
            continue
        register_checkpoint_conversion_mapping(key, patched_mapping(stock, owners), overwrite=True)
    # A fused checkpoint already in the model's names: where stock renamings misfire on its keys,
    # transformers loads a key under its own name, which a defused model no longer has; the
    # splits take such a fused key instead (see set_unrenamed_key_fallback).
    set_unrenamed_key_fallback(_plain_splits if PATCHES.active else None)


def _plain_splits(converters: list[Any]) -> list[Any]:
    """The converters that split a fused tensor (or dense gate-up) of a defused module as it is,
    with no stock reordering before: what takes a fused key under its own name."""
    from defuser.engine.checkpoint import is_plain_split

    return [converter for converter in converters if is_plain_split(converter)]


def _register_stock(key: str, stock: list[Any] | None) -> None:
    from transformers import conversion_mapping

    # A key that had no mapping is forgotten (where this release allows) rather than given an
    # empty one, which would still count as "found" for a class name.
    if stock is None and forget_checkpoint_conversion_mapping(key):
        return
    conversion_mapping.register_checkpoint_conversion_mapping(key, stock or [], overwrite=True)


def mapping_keys(plan: PreloadPlan) -> tuple[str, ...]:
    return plan.mapping_types or (plan.model_type,)


def patched_mapping(stock: list[Any] | None, owners: list[ActivePatch]) -> list[Any]:
    """The stock transforms with fused-experts handling swapped for per-expert loading."""
    from copy import deepcopy

    from transformers.core_model_loading import WeightRenaming

    from defuser.engine.checkpoint import (
        SplitFusedDense,
        SplitFusedExperts,
        expert_projection_renames,
        fuses_dense_halves,
        fuses_expert_keys,
        leaving_per_expert_keys,
        per_expert_renames,
        split_on_load_converter,
        takes_per_expert_keys,
    )
    from defuser.engine.save import fused_on_save_converter

    targets: dict[str, str] = {}
    for active in owners:
        for name, target in active.fused_tensors.items():
            targets.setdefault(name, target)
    tensor_names = sorted(targets, key=len, reverse=True)
    dense_names = sorted({name for active in owners for name in active.dense_names})
    kept: list[Any] = []
    renames: list[Any] = []
    chained: list[Any] = []
    for transform in deepcopy(stock or []):
        if fuses_expert_keys(transform) or _merges_expert_keys(transform, tensor_names):
            # A converter doing more than stacking (Ernie-4.5-VL's split of the checkpoint's
            # experts between text and vision experts) keeps its operations, then splits.
            reordered = None if _stacks_only(transform) else _reordering_of_fused_tensor(transform, targets, True)
            if reordered is not None:
                chained.append(reordered)
                continue
            # Per-expert checkpoint keys now load as they are (under defuser's names).
            renames.extend(per_expert_renames(transform))
            continue
        if fuses_dense_halves(transform) and "gate_up_proj" in dense_names:
            continue
        reordered = _reordering_of_fused_tensor(transform, targets)
        if reordered is not None:
            chained.append(reordered)
            continue
        # Per-expert checkpoint keys now load as they are: no other converter may take them.
        kept.append(leaving_per_expert_keys(transform) if takes_per_expert_keys(transform) else transform)
    splits = [
        split_on_load_converter(
            rf"(?<![^.])(?:{re.escape(name)})$", targets[name], [SplitFusedExperts(name, targets[name])]
        )
        for name in tensor_names
    ]
    for name in dense_names:
        for part in ("weight", "bias"):
            operation = SplitFusedDense(name, part)
            source = rf"(?<![^.]){re.escape(f'{name}.{part}')}$"
            splits.append(split_on_load_converter(source, operation.target, [operation]))
    extra: list[Any] = []
    for active in owners:
        plan = active.plan
        extra.extend(WeightRenaming(source, target) for source, target in plan.key_renames)
        extra.extend(expert_projection_renames(plan.legacy_projection_names))
    # At most one converter takes a key: parallel places after the dense splits.
    parallel = parallel_converters([active.parallel for active in owners if active.parallel])
    # Last: transformers reverses the mapping on save, so this takes its keys first and writes
    # them as stock transformers writes the fused model.
    # A copy: transformers 5.3.0 reverses a converter (on save) into one sharing its pattern
    # lists and strips their anchors in place, which must not reach the stock mapping restored later.
    on_save = fused_on_save_converter(
        deepcopy(stock or []), experts=bool(tensor_names), dense=bool(dense_names), parallel=bool(parallel)
    )
    return kept + renames + extra + chained + splits + parallel + [on_save]


def _target_tensor(transform: Any, tensor_names: list[str]) -> str | None:
    from defuser.engine.checkpoint import unescape_pattern

    for target in converter_patterns(transform, "target_patterns"):
        target = unescape_pattern(target)
        name = next((name for name in tensor_names if target == name or target.endswith(f".{name}")), None)
        if name is not None:
            return name
    return None


def _merges_expert_keys(transform: Any, tensor_names: list[str]) -> bool:
    """A stock converter reading per-expert keys (``*`` in a source) into fused experts tensors."""
    from transformers.core_model_loading import WeightConverter

    if not isinstance(transform, WeightConverter):
        return False
    sources = converter_patterns(transform, "source_patterns")
    return any("*" in source for source in sources) and _target_tensor(transform, tensor_names) is not None


def _stacks_only(transform: Any) -> bool:
    """A stock converter that only stacks per-expert keys (and concatenates gate and up)."""
    operations = [type(op).__name__ for op in getattr(transform, "operations", None) or []]
    return operations in (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


def _reordering_of_fused_tensor(transform: Any, targets: dict[str, str], per_expert: bool = False) -> Any | None:
    """For a stock converter that reorders fused checkpoint tensors (transpose, interleave,
    split into gate and up, concatenate separately stored gate and up, dequantize with companion
    scales) into fused experts tensors: a converter doing the same and then splitting each
    result per expert."""
    from transformers.core_model_loading import WeightConverter

    from defuser.engine.checkpoint import SplitFusedExperts, split_on_load_converter, unescape_pattern

    operations = list(getattr(transform, "operations", None) or [])
    if not isinstance(transform, WeightConverter) or not operations:
        return None
    sources = converter_patterns(transform, "source_patterns")
    stock_targets = converter_patterns(transform, "target_patterns")
    # Several sources: fused tensors concatenated (Step3p7's stacked gate and up) or one tensor
    # with optional companions (Inkling2-Loop's quantization scales), read as the stock one reads them.
    if not sources or (not per_expert and any("*" in source for source in sources)):
        return None
    by_length = sorted(targets, key=len, reverse=True)
    names = []
    for stock_target in stock_targets:
        plain = unescape_pattern(stock_target)
        name = next((name for name in by_length if plain == name or plain.endswith(f".{name}")), None)
        if name is None:
            return None  # it also writes something that is not a fused experts tensor
        names.append((plain, name))
    # A transpose that checks the model's tensor shape cannot run against a defused module; the
    # split recognises the checkpoint's orientation by shape instead.
    steps = [op for op in operations if not getattr(op, "check_dims", False)]
    if not per_expert and any(getattr(op, "supports_many_to_many", False) for op in steps):
        return None
    # The converter's targets name defused keys (transformers hands over only keys of the
    # model); the earlier operations key their results by them.
    new_targets = [f"{plain.removesuffix(name)}{targets[name]}" for plain, name in names]
    inputs = {target: name for target, (_, name) in zip(new_targets, names, strict=True)} if len(names) > 1 else None
    first = names[0][1]
    # Each result is split into the module its own target names.
    owners = {target: targets[name] for target, (_, name) in zip(new_targets, names, strict=True)} if inputs else None
    split = SplitFusedExperts(first, targets[first], inputs=inputs, input_targets=owners)
    converter = split_on_load_converter(sources if len(sources) > 1 else sources[0], new_targets, [*steps, split])
    for attribute in ("scope_prefix", "base_model_prefix"):
        if getattr(transform, attribute, None) is not None:
            setattr(converter, attribute, getattr(transform, attribute))
    return converter
