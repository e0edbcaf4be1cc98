"""What a plugin declares for pre-load patching of one model type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defuser.engine.candidates import DenseLayout, ParallelLayout

__all__ = ["PreloadPlan"]


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
    defused as the model holding them finishes construction (see :mod:`defuser.engine.parallel_preload`).
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
