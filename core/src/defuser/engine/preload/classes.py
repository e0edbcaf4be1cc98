"""Replacing fused classes before a model is built: find the experts and dense MLP classes a
plan names, build their replacements, and bind them wherever transformers' loaded modules hold
the stock class.

Each experts class of the plan's modeling modules (decorated, or declared with its layout) is
replaced by its ``Defused<Name>`` class, each declared dense MLP with a fused gate-up Linear by
a subclass that splits it at construction.  The replacement is bound in the defining module
(and wherever a loaded transformers module holds the class), so ``from_pretrained``,
``from_config`` and direct construction all build defused blocks.  Classes that a model records
outputs of also go into ``transformers.monkey_patching.register_patch_mapping`` so the
recorders follow (see :func:`recorded_class_names` for why the registry is not used for the
others).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from defuser._hf import has_experts_gate, is_experts_forward, recorded_output_class_names
from defuser.engine.candidates import DenseLayout, ExpertsLayout, declared_experts_layout, read_experts_layout
from defuser.engine.contract import class_refusal, decorated_class
from defuser.engine.experts import DefusedExperts, defused_class_for
from defuser.engine.parallel_preload import source_assignments
from defuser.engine.preload.plan import PreloadPlan
from defuser.engine.preload.state import PATCHES
from defuser.errors import ConversionError

__all__ = [
    "decorated_experts_classes",
    "fused_dense_classes",
    "install_classes",
    "original_class",
    "recorded_class_names",
    "resolve_classes",
]

logger = logging.getLogger(__name__)


def decorated_experts_classes(module: Any) -> dict[str, type[nn.Module]]:
    """Classes in ``module`` wrapped by ``@use_experts_implementation``, by name.

    Recognised by the wrapper transformers installs, so a renamed class is still found.
    """
    found = {}
    for name, value in vars(module).items():
        value = original_class(value)
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            continue
        if value.__module__ != module.__name__:
            continue
        if _is_decorated_experts_class(value):
            found[name] = value
    return found


def original_class(value: Any) -> Any:
    """The stock class behind a replacement pre-load patching installed (or ``value`` itself)."""
    if isinstance(value, type) and issubclass(value, DefusedExperts) and value.fused_class is not None:
        return value.fused_class
    return value.__dict__.get("_defuser_original", value) if isinstance(value, type) else value


def _is_decorated_experts_class(cls: type) -> bool:
    return is_experts_forward(getattr(cls, "forward", None)) and has_experts_gate(cls)


def _overriding_subclasses(module: Any) -> dict[str, type[nn.Module]]:
    """Classes defined in ``module`` that derive from a decorated experts class and override
    what it computes (ergo's ``ErgoExperts``), by name."""
    found = {}
    for name, value in vars(module).items():
        value = original_class(value)
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
    # The device a tensor made now lands on: ``torch.get_default_device()`` reads the whole
    # torch-function mode stack (about a millisecond per call, once per experts module).
    device = torch.empty(0).device
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


def _replacement(
    key: tuple[str, str],
    fused: type[nn.Module],
    overrides: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
    dense: DenseLayout | None = None,
) -> type:
    """The class replacing ``fused`` (at ``key``): the one installed now when another patched
    model type replaced it already, else a new dense or experts replacement."""
    existing = PATCHES.replacements.get(key)
    if existing is not None:
        return existing
    if dense is not None:
        return _dense_replacement(fused, dense)
    return _preload_experts_class(fused, fields, overrides)


def _load_targets(layout: ExpertsLayout) -> dict[str, str]:
    """Fused tensor names of ``layout``, biases included whether or not it has them (a
    class's instances may differ) -> the defused key expert 0 loads each through."""
    # Separate gate and up tensors with biases are refused (ExpertsLayout): such a layout has none.
    with_biases = layout if layout.separate_gate_up else replace(layout, has_bias=True)
    return {tensor.name: tensor.load_target for tensor in with_biases.tensors()}


# Decorated experts classes: gated or not, read per instance.
_DECORATED_TARGETS = {
    **_load_targets(ExpertsLayout(num_experts=0)),
    **_load_targets(ExpertsLayout(num_experts=0, has_gate=False)),
}


def _declared_targets(fields: dict[str, Any]) -> dict[str, str]:
    """Fused tensor names of a declared experts layout -> the defused key expert 0 loads each through."""
    static = {key: value for key, value in fields.items() if not callable(value)}
    return _load_targets(ExpertsLayout(num_experts=0, **static))


def resolve_classes(plan: PreloadPlan) -> tuple[dict[tuple[str, str], tuple[type, type]], dict[str, str], set[str]]:
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
            fused = original_class(getattr(module, name, None))
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
            original = original_class(getattr(module, name))
            if original.__module__ != module_name:
                continue
            classes[(module_name, name)] = (original, _replacement((module_name, name), original, dense=layout))
            dense_names.add(layout.fused_name)
    if refusals:
        raise ConversionError(
            f"replace_fused_blocks({plan.model_type!r}) cannot patch " + "; ".join(refusals) + "; nothing was patched"
        )
    return classes, tensor_names, dense_names


def install_classes() -> None:
    """Rebind every patched class wherever transformers' loaded modules hold it (and the stock
    class of every class no longer patched), and keep transformers' patch registry in step."""
    from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

    wanted: dict[tuple[str, str], type] = {}
    recorded: set[tuple[str, str]] = set()
    for active in PATCHES.active.values():
        for key, (_, replacement) in active.classes.items():
            wanted[key] = replacement
            if key[1] in active.recorded:
                recorded.add(key)
    for key in list(PATCHES.replacements):
        if key not in wanted:
            replacement = PATCHES.replacements.pop(key)
            for module_name, attribute in PATCHES.bound.pop(key, [key]):
                module = sys.modules.get(module_name)
                if module is not None and getattr(module, attribute, None) is replacement:
                    setattr(module, attribute, original_class(replacement))
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
        if PATCHES.replacements.get(key) is replacement:
            continue
        PATCHES.replacements[key] = replacement
        PATCHES.bound[key] = _rebind(key, original_class(replacement), replacement)


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


def recorded_class_names(module_names: tuple[str, ...], patched: set[str]) -> frozenset[str]:
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
            names |= recorded_output_class_names(value)
    return frozenset(names & patched)
