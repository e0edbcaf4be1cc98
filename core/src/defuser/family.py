"""Declaring a model family in a few lines: the base most plugins are made of.

A plugin module creates one :class:`Family` and exposes it through its entry point::

    plugin = Family(
        name="qwen",
        model_types=[TypeSupport("qwen3_moe", preload=True), TypeSupport("qwen3_vl_moe")],
    )

The family claims its model types; decorated experts are read from transformers' own flags
and dense ``gate_up_proj`` MLPs are found by shape.  What differs is declared per class name:
``dense_classes`` (another fused name, reversed halves), ``experts_classes`` (undecorated
experts: their :class:`ExpertsLayout` fields), ``parallel_classes`` (stacked per-expert
projections routed by the parent) and ``layout_overrides`` (quirks of decorated classes).
Override a method (keeping its ``@hookimpl``) only for what declarations cannot say.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from defuser.engine.candidates import (
    Candidate,
    DenseLayout,
    ParallelLayout,
    declared_experts_layout,
    read_experts_layout,
)
from defuser.engine.generic import dense_layout_of
from defuser.engine.parallel import parallel_weight
from defuser.engine.preload import PreloadPlan
from defuser.hookspecs import hookimpl
from defuser.plugin_info import PluginInfo, TypeSupport

__all__ = ["Family", "modeling_module_for"]

logger = logging.getLogger(__name__)


def modeling_module_for(model_type: str) -> str:
    """Import path of the transformers modeling module that defines ``model_type``."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    return f"transformers.models.{module}.modeling_{module}"


def _module_or_none(model_type: str) -> str | None:
    try:
        return modeling_module_for(model_type)
    except Exception:  # a type this transformers does not know
        return None


class Family:
    """A declarative plugin for one family of model types."""

    def __init__(
        self,
        name: str,
        model_types: Iterable[TypeSupport],
        *,
        dense_classes: Mapping[str, DenseLayout] | None = None,
        experts_classes: Mapping[str, Mapping[str, Any]] | None = None,
        parallel_classes: Mapping[str, ParallelLayout] | None = None,
        layout_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        key_renames: Mapping[str, Iterable[tuple[str, str]]] | None = None,
        legacy_projection_names: Mapping[str, Mapping[str, str]] | None = None,
        dense_key_patterns: Mapping[str, Iterable[str]] | None = None,
        transformers: str = ">=5.3.0",
        core: str = ">=0.1,<1",
        priority: int = 0,
        description: str = "",
    ):
        self.info = PluginInfo(
            name=name,
            model_types=tuple(model_types),
            transformers=transformers,
            core=core,
            priority=priority,
            description=description,
        )
        self.dense_classes = dict(dense_classes or {})
        self.experts_classes = {key: dict(value) for key, value in (experts_classes or {}).items()}
        self.parallel_classes = dict(parallel_classes or {})
        self.layout_overrides = {key: dict(value) for key, value in (layout_overrides or {}).items()}
        self.key_renames = {key: tuple(value) for key, value in (key_renames or {}).items()}
        self.legacy_projection_names = {key: dict(value) for key, value in (legacy_projection_names or {}).items()}
        self.dense_key_patterns = {key: tuple(value) for key, value in (dense_key_patterns or {}).items()}

    def __repr__(self) -> str:
        return f"Family({self.info.name!r}, {len(self.info.model_types)} model types)"

    @hookimpl
    def defuser_plugin_info(self) -> PluginInfo:
        return self.info

    @hookimpl
    def defuser_detect_candidate(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        if not self.info.claims(model_type):
            return None
        class_name = type(module).__name__
        if class_name in self.dense_classes:
            dense = dense_layout_of(module, self.dense_classes[class_name])
            return None if dense is None else Candidate(path, module, "dense", self.info.name, dense, model_type)
        if class_name in self.parallel_classes:
            parallel = self.parallel_classes[class_name]
            if parallel_weight(module, parallel) is None:
                return None
            return Candidate(path, module, "parallel", self.info.name, parallel, model_type)
        if class_name in self.experts_classes:
            layout = declared_experts_layout(module, **self.experts_classes[class_name])
        else:
            layout = read_experts_layout(module)
        if layout is None:
            return None
        overrides = self.layout_overrides.get(class_name)
        if overrides:
            layout = layout.with_overrides(**overrides)
        return Candidate(path, module, "experts", self.info.name, layout, model_type)

    @hookimpl
    def defuser_preload_plan(self, model_type: str) -> PreloadPlan | None:
        support = self.info.support_for(model_type)
        if support is None or not support.preload:
            return None
        module_name = modeling_module_for(model_type)
        # Sub-models (thinker, talker, text-only) load through their own model types.
        related = tuple(
            t.model_type
            for t in self.info.model_types
            if t.model_type != model_type and _module_or_none(t.model_type) == module_name
        )
        return PreloadPlan(
            model_type=model_type,
            mapping_types=(model_type, *related),
            modeling_modules=(module_name,),
            dense_classes=self._dense_classes_in(module_name),
            key_renames=self.key_renames.get(model_type, ()),
            legacy_projection_names=self.legacy_projection_names.get(model_type, {}),
            dense_key_patterns=self.dense_key_patterns.get(model_type, ()),
        )

    def _dense_classes_in(self, module_name: str) -> dict[str, DenseLayout]:
        import importlib

        module = importlib.import_module(module_name)
        return {name: layout for name, layout in self.dense_classes.items() if hasattr(module, name)}
