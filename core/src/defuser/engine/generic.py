"""Core's own plugin: the generic engine, asked last for every hook.

It detects any experts module that ``@use_experts_implementation`` decorated, from the flags
the decorator records, and defuses every standard layout, so a family transformers adds
tomorrow is handled without a plugin.
"""

from __future__ import annotations

import logging

from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, read_experts_layout
from defuser.engine.dense import split_dense_mlp
from defuser.engine.experts import DefusedExperts
from defuser.hookspecs import hookimpl
from defuser.plugin_info import PluginInfo

__all__ = ["GENERIC_PLUGIN_NAME", "GenericEngine", "defuse"]

logger = logging.getLogger(__name__)

GENERIC_PLUGIN_NAME = "generic"


def defuse(candidate: Candidate) -> nn.Module:
    """Defuse ``candidate`` with the generic engine and return what takes its place."""
    if candidate.kind == "dense":
        assert isinstance(candidate.layout, DenseLayout)
        return split_dense_mlp(candidate.module, candidate.layout)
    assert isinstance(candidate.layout, ExpertsLayout)
    return DefusedExperts.from_fused(candidate.module, candidate.layout)


class GenericEngine:
    """Hook implementations of the generic engine (registered as plugin ``generic``)."""

    @hookimpl
    def defuser_plugin_info(self) -> PluginInfo:
        return PluginInfo(
            name=GENERIC_PLUGIN_NAME,
            priority=-1000,
            description="any experts class decorated with @use_experts_implementation",
        )

    @hookimpl(trylast=True)
    def defuser_detect_candidate(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        layout = read_experts_layout(module)
        if layout is None:
            return None
        return Candidate(path, module, "experts", GENERIC_PLUGIN_NAME, layout, model_type, generic=True)

    @hookimpl(trylast=True)
    def defuser_defuse_candidate(self, candidate: Candidate) -> nn.Module | None:
        return defuse(candidate)
