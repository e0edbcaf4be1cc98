"""Pre-load patching: build models with defused blocks and load any checkpoint layout into them.

A :class:`PreloadPlan` (from a plugin) changes two things:

* Classes: each experts class of the plan's modeling modules (decorated, or declared with its
  layout) is replaced by its ``Defused<Name>`` class, each dense MLP with a fused gate-up Linear
  by a subclass that splits it at construction.  The replacement is bound in the defining
  module (and wherever a loaded transformers module holds the class), so ``from_pretrained``,
  ``from_config`` and direct construction all build defused blocks.  Classes that a model
  records outputs of also go into ``transformers.monkey_patching.register_patch_mapping`` so
  the recorders follow (see :func:`_recorded_class_names` for why the registry is not used for
  the others).
* ``transformers.conversion_mapping.register_checkpoint_conversion_mapping``, for every model
  type and class name the plan names: the stock transforms that fuse per-expert (or per-half)
  checkpoint keys are dropped, so those keys load as they are, and their per-expert names
  become renamings (``experts.N.w1`` loads as ``experts.N.gate_proj``, and saves back as
  ``w1``); transforms that reorder a fused checkpoint tensor keep their operations and then
  split it; fused tensors and fused dense Linears are split per expert with each module's
  own layout (:mod:`defuser.engine.checkpoint`).  Ties between fused experts tensors of two
  parts of a model (``_tied_weights_keys``) are left out while patched.

Several model types may patch the same class or mapping; each stays patched while any
patched model type needs it, and goes back to the stock one when none does.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import (
    DenseLayout,
    ExpertsLayout,
    ParallelLayout,
    declared_experts_layout,
    read_experts_layout,
)
from defuser.engine.contract import class_refusal, decorated_class, is_experts_wrapper
from defuser.engine.experts import DefusedExperts, defused_class_for
from defuser.engine.parallel_preload import (
    ParallelPatch,
    install_post_init,
    parallel_converters,
    resolve_parallel,
    source_assignments,
)
from defuser.errors import ConversionError

__all__ = [
    "PreloadPlan",
    "apply_preload_plan",
    "decorated_experts_classes",
    "fused_dense_classes",
    "is_patched",
    "patched_model_types",
    "restore_preload_patches",
]

logger = logging.getLogger(__name__)

_lock = threading.RLock()


@dataclass(frozen=True)
class PreloadPlan:
    """What ``replace_fused_blocks(model_type)`` changes, declared by a plugin.

    ``modeling_modules`` are transformers module names whose experts classes are replaced:
    the decorated ones (all unless ``experts_classes`` names a subset) and the undecorated ones
    ``declared_experts`` describes (class name -> :class:`ExpertsLayout` fields).
    ``layout_overrides`` corrects decorated classes (class name -> fields).  ``dense_classes``
    maps the dense MLP class names in those modules whose fused gate-up Linear is split to
    their layout (any other stays one Linear).  ``key_renames`` are ``(source regex, target)``
    pairs for other legacy checkpoint keys; ``legacy_projection_names`` maps legacy
    per-expert projection names to defused ones (Mixtral: ``{"w1": "gate_proj", ...}``);
    ``dense_key_patterns`` and ``experts_key_prefix`` are kept for plugins written before
    fused keys were split by each module's layout, and are no longer needed.
    ``parallel_classes`` maps parallel-experts class names to their layout: their instances are
    defused as the model holding them finishes construction (see :mod:`.parallel_preload`).
    ``mapping_types`` are the model types and class names whose checkpoint mapping changes
    (default: the model type alone).
    """

    model_type: str
    modeling_modules: tuple[str, ...]
    mapping_types: tuple[str, ...] = ()
    experts_classes: tuple[str, ...] | None = None
    declared_experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense_classes: dict[str, DenseLayout] = field(default_factory=dict)
    key_renames: tuple[tuple[str, str], ...] = ()
    legacy_projection_names: dict[str, str] = field(default_factory=dict)
    dense_key_patterns: tuple[str, ...] = ()
    experts_key_prefix: str = "experts"
    parallel_classes: dict[str, ParallelLayout] = field(default_factory=dict)


@dataclass
class _Active:
    plan: PreloadPlan
    # (module name, class name) -> the class it replaces, and its replacement
    classes: dict[tuple[str, str], tuple[type, type]]
    fused_tensors: dict[str, str]  # fused experts tensor name -> the defused key it loads through
    dense_names: frozenset[str]
    # Patched class names that a model class of these modules records outputs of: transformers'
    # patch registry must know them (see _recorded_class_names).
    recorded: frozenset[str] = frozenset()
    # model class -> its ``_tied_weights_keys`` without ties between fused experts tensors
    tied: dict[type, dict[str, str]] = field(default_factory=dict)
    parallel: ParallelPatch | None = None


# model type -> what its patch holds; a class or mapping stays patched while one needs it.
_active: dict[str, _Active] = {}
# mapping key -> the stock mapping before the first patch touching it
_stock_mappings: dict[str, Any] = {}


def decorated_experts_classes(module: Any) -> dict[str, type[nn.Module]]:
    """Classes in ``module`` wrapped by ``@use_experts_implementation``, by name.

    Recognised by the wrapper transformers installs, so a renamed class is still found.
    """
    found = {}
    for name, value in vars(module).items():
        value = _original_class(value)
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            continue
        if value.__module__ != module.__name__:
            continue
        if _is_decorated_experts_class(value):
            found[name] = value
    return found


def _original_class(value: Any) -> Any:
    """The stock class behind a replacement this module installed (or ``value`` itself)."""
    if isinstance(value, type) and issubclass(value, DefusedExperts) and value.fused_class is not None:
        return value.fused_class
    return value.__dict__.get("_defuser_original", value) if isinstance(value, type) else value


def _is_decorated_experts_class(cls: type) -> bool:
    # ``functools.wraps`` hides the wrapper's name, but its code still closes over the
    # original forward, and the decorator gives every such class an ``_apply_gate``.
    return is_experts_wrapper(cls.forward) and hasattr(cls, "_apply_gate")


def _overriding_subclasses(module: Any) -> dict[str, type[nn.Module]]:
    """Classes defined in ``module`` that derive from a decorated experts class and override
    what it computes (ergo's ``ErgoExperts``), by name."""
    found = {}
    for name, value in vars(module).items():
        value = _original_class(value)
        if not (isinstance(value, type) and issubclass(value, nn.Module)) or value.__module__ != module.__name__:
            continue
        if not _is_decorated_experts_class(value) and class_refusal(value):
            found[name] = value
    return found


_LINEAR_ASSIGNMENT = re.compile(r"Linear$")


def _dense_class_names(module_name: str) -> tuple[str, ...]:
    found = (
        holder
        for holder, target, callee in source_assignments(module_name)
        if target.endswith(".gate_up_proj") and _LINEAR_ASSIGNMENT.search(callee)
    )
    return tuple(dict.fromkeys(found))


def fused_dense_classes(module: Any) -> list[str]:
    """Names of the classes in ``module`` whose ``__init__`` assigns ``self.gate_up_proj`` a Linear."""
    return list(_dense_class_names(module.__name__))


def _preload_experts_class(
    fused: type[nn.Module], fields: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> type[DefusedExperts]:
    """The ``Defused<Name>`` class built in place of ``fused``: its layout is read from the
    decorator's flags (with ``overrides``) or, for an undecorated class, from ``fields``."""
    base = defused_class_for(fused)

    def __init__(self: DefusedExperts, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        # A structure-only instance tells the shapes; the per-expert Linears are then created
        # under the caller's device context so the checkpoint loader (or the init) fills them.
        with torch.device("meta"):
            prototype = fused(*args, **kwargs)
        # A declared field may probe the prototype with a small computation: run it on the CPU
        # even where the model is being built on the meta device.
        with torch.device("cpu"):
            layout = (
                declared_experts_layout(prototype, **fields) if fields is not None else read_experts_layout(prototype)
            )
        if layout is None:
            raise TypeError(f"{fused.__name__} does not hold the experts tensors its layout names")
        self._populate(prototype, layout.with_overrides(**(overrides or {})), materialize=False)
        _materialize_borrowed(self)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def _materialize_borrowed(module: nn.Module) -> None:
    """Give modules taken over from the structure-only prototype (a post-expert norm) real
    storage on the device the model is being built on; its init or the checkpoint fills it."""
    device = torch.get_default_device()
    if device.type == "meta":
        return
    for child in module.modules():
        own = [*child.parameters(recurse=False), *child.buffers(recurse=False)]
        if any(tensor.is_meta for tensor in own):
            child.to_empty(device=device, recurse=False)
            reset = getattr(child, "reset_parameters", None)
            if callable(reset):
                reset()


def _dense_replacement(original: type[nn.Module], layout: DenseLayout) -> type[nn.Module]:
    from defuser.engine.dense import split_class_for, split_dense_mlp
    from defuser.engine.generic import dense_layout_of

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original.__init__(self, *args, **kwargs)
        if dense_layout_of(self, layout) is not None:  # a config may build it unfused (odd width)
            split_dense_mlp(self, layout, materialize=False)

    return type(
        original.__name__,
        (split_class_for(original),),
        {"__init__": __init__, "__module__": original.__module__, "_defuser_original": original},
    )


def _resolve(plan: PreloadPlan) -> tuple[dict[tuple[str, str], tuple[type, type]], dict[str, str], set[str]]:
    """The classes ``plan`` replaces, their fused experts tensor names (with the defused key each
    loads through) and dense fused names."""
    classes: dict[tuple[str, str], tuple[type, type]] = {}
    tensor_names: dict[str, str] = {}
    dense_names: set[str] = set()
    refusals = []
    for module_name in plan.modeling_modules:
        module = importlib.import_module(module_name)
        decorated = decorated_experts_classes(module)
        # Subclasses overriding a decorated forward: only a declaration describes them.
        for name, fused in _overriding_subclasses(module).items():
            if name in plan.layout_overrides:
                decorated[name] = fused
            elif name not in plan.declared_experts:
                refusals.append(f"{module_name}.{name}: {class_refusal(fused)}")
        for name, fused in decorated.items():
            if plan.experts_classes is not None and name not in plan.experts_classes:
                continue
            overrides = plan.layout_overrides.get(name, {})
            classes[(module_name, name)] = (fused, _replacement((module_name, name), fused, overrides=overrides))
            for tensor, target in _DECORATED_TARGETS.items():
                tensor_names.setdefault(tensor, target)
        for name, fields in plan.declared_experts.items():
            fused = _original_class(getattr(module, name, None))
            if not isinstance(fused, type) or fused.__module__ != module_name:
                continue
            if decorated_class(fused) is not None:
                # A release decorated it since: its flags describe it (patched with the decorated ones).
                logger.info("%s: %s declared undecorated, but decorated: its flags describe it", module_name, name)
                continue
            classes[(module_name, name)] = (fused, _replacement((module_name, name), fused, fields=fields))
            for tensor, target in _declared_targets(fields).items():
                tensor_names.setdefault(tensor, target)
        # Only the dense MLP classes the plugin declares are split; any other fused gate-up
        # Linear is already one nn.Linear and stays as transformers builds it.
        dense = {name: layout for name, layout in plan.dense_classes.items() if hasattr(module, name)}
        for name, layout in dense.items():
            original = _original_class(getattr(module, name))
            if original.__module__ != module_name:
                continue
            classes[(module_name, name)] = (original, _replacement((module_name, name), original, dense=layout))
            dense_names.add(layout.fused_name)
    if refusals:
        raise ConversionError(
            f"replace_fused_blocks({plan.model_type!r}) cannot patch " + "; ".join(refusals) + "; nothing was patched"
        )
    return classes, tensor_names, dense_names


# One replacement class per patched class, while it is patched: every model type patching it
# installs the same class object.
_replacements: dict[tuple[str, str], type] = {}
# patched class -> the (module, attribute) places it was rebound in
_bound: dict[tuple[str, str], list[tuple[str, str]]] = {}
# model class -> its own ``_tied_weights_keys`` before a patch changed them
_tied_originals: dict[type, Any] = {}


def _untied_fused_tensors(module_names: tuple[str, ...], tensor_names: set[str]) -> dict[type, dict[str, str]]:
    """Model classes that tie fused experts tensors between two of their parts (DiffusionGemma's
    decoder shares the encoder's experts), with those ties left out: defused modules hold no
    such tensors, and a tie naming nothing fails the build.  The per-expert weights stay tied
    where a broader tie (every ``weight`` of a layer) covers them."""
    from transformers import PreTrainedModel

    suffixes = tuple(sorted(tensor_names))
    found = {}
    for module_name in module_names:
        for value in vars(importlib.import_module(module_name)).values():
            if not (isinstance(value, type) and issubclass(value, PreTrainedModel)):
                continue
            tied = value.__dict__.get("_tied_weights_keys")
            tied = _tied_originals.get(value, tied)
            if not isinstance(tied, dict):
                continue
            kept = {
                target: source
                for target, source in tied.items()
                if not (target.rstrip("$").endswith(suffixes) or source.rstrip("$").endswith(suffixes))
            }
            if len(kept) != len(tied):
                found[value] = kept
    return found


def _install_ties() -> None:
    wanted: dict[type, dict[str, str]] = {}
    for active in _active.values():
        wanted.update(active.tied)
    for cls in list(_tied_originals):
        if cls not in wanted:
            cls._tied_weights_keys = _tied_originals.pop(cls)
    for cls, tied in wanted.items():
        _tied_originals.setdefault(cls, cls.__dict__.get("_tied_weights_keys"))
        cls._tied_weights_keys = tied


def _replacement(
    key: tuple[str, str],
    fused: type[nn.Module],
    overrides: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
    dense: DenseLayout | None = None,
) -> type:
    existing = _replacements.get(key)
    if existing is not None:
        return existing
    if dense is not None:
        return _dense_replacement(fused, dense)
    return _preload_experts_class(fused, fields, overrides)


def _load_targets(layout: ExpertsLayout) -> dict[str, str]:
    """Fused tensor names of ``layout``, biases included whether or not it has them (a
    class's instances may differ) -> the defused key expert 0 loads each through."""
    return {tensor.name: tensor.load_target for tensor in replace(layout, has_bias=True).tensors()}


# Decorated experts classes: gated or not, read per instance.
_DECORATED_TARGETS = {
    **_load_targets(ExpertsLayout(num_experts=0)),
    **_load_targets(ExpertsLayout(num_experts=0, has_gate=False)),
}


def _declared_targets(fields: dict[str, Any]) -> dict[str, str]:
    """Fused tensor names of a declared experts layout -> the defused key expert 0 loads each through."""
    static = {key: value for key, value in fields.items() if not callable(value)}
    return _load_targets(ExpertsLayout(num_experts=0, **static))


def _install() -> None:
    from defuser.engine.distributed_preload import sync_distributed_preload

    _install_classes()
    _install_ties()
    # Parallel plans of models built while patched must match their defused blocks.
    sync_distributed_preload(active=bool(_active))
    roots = {root for active in _active.values() if active.parallel for root in active.parallel.roots}
    install_post_init(roots, _parallel_layouts)


def _parallel_layouts() -> dict[type, ParallelLayout]:
    """Every parallel-experts class patched now, with its layout."""
    patches = [active.parallel for active in list(_active.values()) if active.parallel]
    return {cls: layout for patch in patches for cls, layout in patch.layouts.items()}


def _install_classes() -> None:
    """Rebind every patched class wherever transformers' loaded modules hold it (and the stock
    class of every class no longer patched), and keep transformers' patch registry in step."""
    from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

    wanted: dict[tuple[str, str], type] = {}
    recorded: set[tuple[str, str]] = set()
    for active in _active.values():
        for key, (_, replacement) in active.classes.items():
            wanted[key] = replacement
            if key[1] in active.recorded:
                recorded.add(key)
    for key in list(_replacements):
        if key not in wanted:
            replacement = _replacements.pop(key)
            for module_name, attribute in _bound.pop(key, [key]):
                module = sys.modules.get(module_name)
                if module is not None and getattr(module, attribute, None) is replacement:
                    setattr(module, attribute, _original_class(replacement))
    by_name: dict[str, set[type]] = {}
    for key in recorded:
        by_name.setdefault(key[1], set()).add(wanted[key])
    # Anchored: transformers matches registry keys as regular expressions anywhere in a name.
    registry = {f"^{name}$": found.pop() for name, found in by_name.items() if len(found) == 1}
    registered = get_patch_mapping()
    stale = [name for name, value in registered.items() if _is_ours(value) and registry.get(name) is not value]
    if stale:
        unregister_patch_mapping(stale)
    if registry:
        register_patch_mapping(registry, overwrite=True)
    for key, replacement in wanted.items():
        if _replacements.get(key) is replacement:
            continue
        _replacements[key] = replacement
        _bound[key] = _rebind(key, _original_class(replacement), replacement)


def _rebind(key: tuple[str, str], original: type, replacement: type) -> list[tuple[str, str]]:
    """Put ``replacement`` wherever a loaded transformers module holds ``original`` (its defining
    module first); modules imported later take it from the defining module."""
    places = [key]
    setattr(importlib.import_module(key[0]), key[1], replacement)
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == key[0] or not module_name.startswith("transformers."):
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, attribute, replacement)
                places.append((module_name, attribute))
    return places


def _is_ours(value: Any) -> bool:
    return isinstance(value, type) and (issubclass(value, DefusedExperts) or hasattr(value, "_defuser_original"))


def _install_mappings(keys: set[str]) -> None:
    """Register, for each mapping key, the stock mapping patched for every active plan naming it
    (the stock mapping itself when none does)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for key in sorted(keys):
        owners = [active for active in _active.values() if key in _mapping_keys(active.plan)]
        if key not in _stock_mappings:
            _stock_mappings[key] = get_checkpoint_conversion_mapping(key)
        stock = _stock_mappings[key]
        if not owners:
            _register_stock(key, stock)
            del _stock_mappings[key]
            continue
        register_checkpoint_conversion_mapping(key, _patched_mapping(stock, owners), overwrite=True)


def _register_stock(key: str, stock: list[Any] | None) -> None:
    from transformers import conversion_mapping

    if stock is None:
        # No public way to forget a key; an empty list would still count as "found" for a
        # class name (and hide its model type's mapping), so the key is dropped where possible.
        cache = getattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
        if isinstance(cache, dict):
            cache.pop(key, None)
            registered = getattr(conversion_mapping, "USER_REGISTERED_MAPPINGS", None)
            if isinstance(registered, set):
                registered.discard(key)
            return
    conversion_mapping.register_checkpoint_conversion_mapping(key, stock or [], overwrite=True)


def _mapping_keys(plan: PreloadPlan) -> tuple[str, ...]:
    return plan.mapping_types or (plan.model_type,)


def _patched_mapping(stock: list[Any] | None, owners: list[_Active]) -> list[Any]:
    """The stock transforms with fused-experts handling swapped for per-expert loading."""
    from copy import deepcopy

    from transformers.core_model_loading import WeightRenaming

    from defuser.engine.checkpoint import (
        SplitFusedDense,
        SplitFusedExperts,
        expert_projection_renames,
        fuses_dense_halves,
        fuses_expert_keys,
        per_expert_renames,
        split_on_load_converter,
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
            # Per-expert checkpoint keys now load as they are (under defuser's names).
            renames.extend(per_expert_renames(transform))
            continue
        if fuses_dense_halves(transform) and "gate_up_proj" in dense_names:
            continue
        reordered = _reordering_of_fused_tensor(transform, targets)
        if reordered is not None:
            chained.append(reordered)
            continue
        kept.append(transform)
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
    on_save = fused_on_save_converter(
        stock or [], experts=bool(tensor_names), dense=bool(dense_names), parallel=bool(parallel)
    )
    return kept + renames + extra + chained + splits + parallel + [on_save]


def _target_tensor(transform: Any, tensor_names: list[str]) -> str | None:
    targets = getattr(transform, "_original_target_patterns", None) or transform.target_patterns
    for target in targets:
        target = re.sub(r"\\(.)", r"\1", target).removeprefix("^").removesuffix("$")
        name = next((name for name in tensor_names if target == name or target.endswith(f".{name}")), None)
        if name is not None:
            return name
    return None


def _merges_expert_keys(transform: Any, tensor_names: list[str]) -> bool:
    """A stock converter reading per-expert keys (``*`` in a source) into fused experts tensors."""
    from transformers.core_model_loading import WeightConverter

    if not isinstance(transform, WeightConverter):
        return False
    sources = getattr(transform, "_original_source_patterns", None) or transform.source_patterns
    return any("*" in source for source in sources) and _target_tensor(transform, tensor_names) is not None


def _reordering_of_fused_tensor(transform: Any, targets: dict[str, str]) -> Any | None:
    """For a stock converter that reorders one fused checkpoint tensor (transpose, interleave,
    split into gate and up) into fused experts tensors: a converter doing the same and then
    splitting each result per expert."""
    from transformers.core_model_loading import WeightConverter

    from defuser.engine.checkpoint import SplitFusedExperts, split_on_load_converter

    operations = list(getattr(transform, "operations", None) or [])
    if not isinstance(transform, WeightConverter) or not operations:
        return None
    sources = getattr(transform, "_original_source_patterns", None) or transform.source_patterns
    stock_targets = getattr(transform, "_original_target_patterns", None) or transform.target_patterns
    if len(sources) != 1 or "*" in sources[0]:
        return None
    by_length = sorted(targets, key=len, reverse=True)
    names = []
    for stock_target in stock_targets:
        plain = re.sub(r"\\(.)", r"\1", stock_target).removeprefix("^").removesuffix("$")
        name = next((name for name in by_length if plain == name or plain.endswith(f".{name}")), None)
        if name is None:
            return None  # it also writes something that is not a fused experts tensor
        names.append((plain, name))
    # A transpose that checks the model's tensor shape cannot run against a defused module; the
    # split recognises the checkpoint's orientation by shape instead.
    steps = [op for op in operations if not getattr(op, "check_dims", False)]
    if any(getattr(op, "supports_many_to_many", False) for op in steps):
        return None
    # The converter's targets name defused keys (transformers hands over only keys of the
    # model); the earlier operations key their results by them.
    new_targets = [f"{plain.removesuffix(name)}{targets[name]}" for plain, name in names]
    inputs = {target: name for target, (_, name) in zip(new_targets, names, strict=True)} if len(names) > 1 else None
    first = names[0][1]
    split = SplitFusedExperts(first, targets[first], inputs=inputs)
    converter = split_on_load_converter(sources[0], new_targets, [*steps, split])
    for attribute in ("scope_prefix", "base_model_prefix"):
        if getattr(transform, attribute, None) is not None:
            setattr(converter, attribute, getattr(transform, attribute))
    return converter


def _recorded_class_names(module_names: tuple[str, ...], patched: set[str]) -> frozenset[str]:
    """Those of ``patched`` that a model class of ``module_names`` records outputs of.

    Only these go into transformers' patch registry, whose ``patch_output_recorders`` then
    points the recorders at the replacements.  The registry is not used for the rest: with any
    entry registered, transformers scans every loaded transformers module on each
    ``from_pretrained``/``from_config`` (a noticeable cost once many models are imported), and
    5.24.0's ``patch_output_recorders`` fails on models recording a tuple of classes
    (Inkling-2-Loop), whatever type was patched.  Rebinding the classes covers construction.
    """
    from transformers import PreTrainedModel

    names: set[str] = set()
    for module_name in module_names:
        for value in vars(importlib.import_module(module_name)).values():
            if not (isinstance(value, type) and issubclass(value, PreTrainedModel)):
                continue
            for recorders in (getattr(value, "_can_record_outputs", None) or {}).values():
                for recorder in recorders if isinstance(recorders, list) else [recorders]:
                    target = getattr(recorder, "target_class", None) or getattr(recorder, "class_name", None)
                    targets = target if isinstance(target, tuple) else (target if target is not None else recorder,)
                    for item in targets:
                        names.add(item if isinstance(item, str) else getattr(item, "__name__", ""))
    return frozenset(names & patched)


def apply_preload_plan(plan: PreloadPlan) -> bool:
    """Register the class replacements and checkpoint mapping of ``plan`` (idempotent)."""
    with _lock:
        if plan.model_type in _active:
            return True
        classes, tensor_names, dense_names = _resolve(plan)
        parallel = resolve_parallel(plan.modeling_modules, plan.parallel_classes) if plan.parallel_classes else None
        if not classes and parallel is None:
            logger.warning("nothing to patch for model type %r in %s", plan.model_type, plan.modeling_modules)
            return False
        active = _Active(plan, classes, tensor_names, frozenset(dense_names), parallel=parallel)
        active.recorded = _recorded_class_names(plan.modeling_modules, {name for _, name in classes})
        active.tied = _untied_fused_tensors(plan.modeling_modules, tensor_names)
        _active[plan.model_type] = active
        try:
            _install()
            _install_mappings(set(_mapping_keys(plan)))
        except BaseException:
            del _active[plan.model_type]
            _install()
            _install_mappings(set(_mapping_keys(plan)))
            raise
        names = sorted({name for _, name in classes} | {cls.__name__ for cls in (parallel.layouts if parallel else ())})
        logger.info("patched %s before load: %s", plan.model_type, ", ".join(names))
        return True


def is_patched(model_type: str) -> bool:
    """True while ``model_type`` is patched by :func:`apply_preload_plan`."""
    return model_type in _active


def patched_model_types() -> list[str]:
    """The model types patched now, in the order they were patched."""
    return list(_active)


def restore_preload_patches(model_type: str | None = None) -> list[str]:
    """Undo :func:`apply_preload_plan` for ``model_type`` (all when None); returns the types restored.

    A class or checkpoint mapping that another patched model type still needs stays patched.
    """
    with _lock:
        types = [model_type] if model_type is not None else list(_active)
        removed = [_active.pop(current) for current in types if current in _active]
        if not removed:
            return []
        _install()
        _install_mappings({key for active in removed for key in _mapping_keys(active.plan)})
        return [active.plan.model_type for active in removed]
