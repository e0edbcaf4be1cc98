"""Pre-load patching: build models with defused blocks and load any checkpoint layout into them.

A :class:`PreloadPlan` (from a plugin) becomes two registrations in transformers' own
extension points:

* ``transformers.monkey_patching.register_patch_mapping``: each decorated experts class of
  the plan's modeling modules maps to its ``Defused<Name>`` class, each listed dense MLP to a
  subclass that splits its gate-up at construction.  The class name is also rebound in the
  modeling module so direct construction (``Model(config)``) builds defused blocks too.
* ``transformers.conversion_mapping.register_checkpoint_conversion_mapping``: the stock
  transforms that fuse per-expert checkpoint keys are dropped (those keys now load as they
  are) and replaced by transforms that split fused checkpoint tensors per expert, plus the
  plan's legacy key renames.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from defuser.engine.candidates import DenseLayout
from defuser.engine.dense import split_dense_mlp
from defuser.engine.experts import DefusedExperts, defused_class_for

__all__ = [
    "PreloadPlan",
    "apply_preload_plan",
    "decorated_experts_classes",
    "is_patched",
    "restore_preload_patches",
]

logger = logging.getLogger(__name__)

_lock = threading.RLock()
# model_type -> what was replaced, so a restore can put it back.
_applied: dict[str, _AppliedPatch] = {}


@dataclass(frozen=True)
class PreloadPlan:
    """What ``replace_fused_blocks(model_type)`` changes, declared by a plugin.

    ``modeling_modules`` are transformers module names whose decorated experts classes are
    replaced (all of them unless ``experts_classes`` names a subset).  ``dense_classes`` maps
    dense MLP class names in those modules to their layout.  ``key_renames`` are
    ``(source regex, target)`` pairs for other legacy checkpoint keys;
    ``legacy_projection_names`` maps legacy per-expert projection names to defused ones
    (Mixtral: ``{"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}``);
    ``dense_key_patterns`` are checkpoint keys of fused dense Linears to split on load.
    ``mapping_types`` are the model types whose checkpoint mapping changes (default: the
    model type alone; composites add their sub-models' types).
    """

    model_type: str
    modeling_modules: tuple[str, ...]
    mapping_types: tuple[str, ...] = ()
    experts_classes: tuple[str, ...] | None = None
    dense_classes: dict[str, DenseLayout] = field(default_factory=dict)
    key_renames: tuple[tuple[str, str], ...] = ()
    legacy_projection_names: dict[str, str] = field(default_factory=dict)
    dense_key_patterns: tuple[str, ...] = ()
    experts_key_prefix: str = "experts"


@dataclass
class _AppliedPatch:
    plan: PreloadPlan
    replaced: dict[tuple[str, str], type] = field(default_factory=dict)
    previous_mappings: dict[str, Any] = field(default_factory=dict)


def decorated_experts_classes(module: Any) -> dict[str, type[nn.Module]]:
    """Classes in ``module`` wrapped by ``@use_experts_implementation``, by name.

    Recognised by the wrapper transformers installs, so a renamed class is still found.
    """
    found = {}
    for name, value in vars(module).items():
        if isinstance(value, type) and issubclass(value, DefusedExperts):
            value = value.fused_class
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            continue
        if value.__module__ != module.__name__:
            continue
        if _is_decorated_experts_class(value):
            found[name] = value
    return found


def _is_decorated_experts_class(cls: type) -> bool:
    # ``functools.wraps`` hides the wrapper's name, but its code still closes over the
    # original forward, and the decorator gives every such class an ``_apply_gate``.
    forward = cls.forward
    code = getattr(forward, "__code__", None)
    return (
        hasattr(forward, "__wrapped__")
        and hasattr(cls, "_apply_gate")
        and code is not None
        and "original_forward" in code.co_freevars
    )


def _dense_replacement(original: type[nn.Module], layout: DenseLayout) -> type[nn.Module]:
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original.__init__(self, *args, **kwargs)
        split_dense_mlp(self, layout, materialize=False)

    return type(
        original.__name__,
        (original,),
        {"__init__": __init__, "__module__": original.__module__, "_defuser_original": original},
    )


def _split_transforms(plan: PreloadPlan) -> list[Any]:
    from transformers.core_model_loading import Chunk, WeightRenaming

    from defuser.engine.checkpoint import SplitFusedExperts, expert_projection_renames, split_on_load_converter

    prefix = plan.experts_key_prefix
    transforms: list[Any] = [
        split_on_load_converter(
            rf"{prefix}\.gate_up_proj$",
            [f"{prefix}.0.gate_proj.weight", f"{prefix}.0.up_proj.weight"],
            SplitFusedExperts(gated=True),
        ),
        split_on_load_converter(
            rf"{prefix}\.down_proj$", [f"{prefix}.0.down_proj.weight"], SplitFusedExperts(gated=False)
        ),
    ]
    for pattern in plan.dense_key_patterns:
        stem = pattern.rsplit(".gate_up_proj", 1)[0]
        transforms.append(
            split_on_load_converter(
                pattern, [f"{stem}.gate_proj.weight", f"{stem}.up_proj.weight"], Chunk(dim=0), keep_reverse=True
            )
        )
    transforms.extend(WeightRenaming(source, target) for source, target in plan.key_renames)
    transforms.extend(expert_projection_renames(plan.legacy_projection_names))
    return transforms


def _fuses_experts(transform: Any) -> bool:
    targets = [str(target) for target in getattr(transform, "target_patterns", [])]
    return any(target.rstrip("$").endswith(("experts.gate_up_proj", "experts.down_proj")) for target in targets)


def _checkpoint_mapping(plan: PreloadPlan, model_type: str) -> tuple[list[Any], Any]:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    stock = get_checkpoint_conversion_mapping(model_type)
    kept = [transform for transform in (stock or []) if not _fuses_experts(transform)]
    return kept + _split_transforms(plan), stock


def apply_preload_plan(plan: PreloadPlan) -> bool:
    """Register the class replacements and checkpoint mapping of ``plan`` (idempotent)."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.monkey_patching import register_patch_mapping

    with _lock:
        if plan.model_type in _applied:
            return True
        applied = _AppliedPatch(plan)
        replacements: dict[str, type[nn.Module]] = {}
        for module_name in plan.modeling_modules:
            module = importlib.import_module(module_name)
            experts = decorated_experts_classes(module)
            for name, fused in experts.items():
                if plan.experts_classes is None or name in plan.experts_classes:
                    replacements[name] = defused_class_for(fused)
                    applied.replaced[(module_name, name)] = fused
            for name, layout in plan.dense_classes.items():
                current = getattr(module, name)
                original = getattr(current, "_defuser_original", current)
                replacements[name] = _dense_replacement(original, layout)
                applied.replaced[(module_name, name)] = original
        if not replacements:
            logger.warning("nothing to patch for model type %r in %s", plan.model_type, plan.modeling_modules)
            return False
        mappings = {}
        for model_type in plan.mapping_types or (plan.model_type,):
            mappings[model_type], applied.previous_mappings[model_type] = _checkpoint_mapping(plan, model_type)
        register_patch_mapping(replacements, overwrite=True)
        for model_type, mapping in mappings.items():
            register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)
        for (module_name, name), _ in applied.replaced.items():
            setattr(importlib.import_module(module_name), name, replacements[name])
        _applied[plan.model_type] = applied
        logger.info("patched %s before load: %s", plan.model_type, ", ".join(sorted(replacements)))
        return True


def is_patched(model_type: str) -> bool:
    """True while ``model_type`` is patched by :func:`apply_preload_plan`."""
    return model_type in _applied


def restore_preload_patches(model_type: str | None = None) -> list[str]:
    """Undo :func:`apply_preload_plan` for ``model_type`` (all when None); returns the types restored."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.monkey_patching import get_patch_mapping, unregister_patch_mapping

    with _lock:
        types = [model_type] if model_type is not None else list(_applied)
        restored = []
        for current_type in types:
            applied = _applied.pop(current_type, None)
            if applied is None:
                continue
            registered = get_patch_mapping()
            names = sorted({name for _, name in applied.replaced if name in registered})
            if names:
                unregister_patch_mapping(names)
            for (module_name, name), original in applied.replaced.items():
                setattr(importlib.import_module(module_name), name, original)
            for mapped_type, previous in applied.previous_mappings.items():
                register_checkpoint_conversion_mapping(mapped_type, previous or [], overwrite=True)
            restored.append(current_type)
        return restored
