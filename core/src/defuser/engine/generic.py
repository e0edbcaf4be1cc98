"""Core's own plugin: the generic engine, asked last for every hook.

It detects any experts module that ``@use_experts_implementation`` decorated, from the flags
the decorator records, and defuses it, so a family transformers adds tomorrow is handled
without a plugin.  A dense MLP whose ``gate_up_proj`` is one ``nn.Linear`` is left as it is
(it is already a plain Linear; quantizers and tools that follow ModelCloud's Defuser expect it
there) unless a plugin declares its class in ``dense_classes``.  Plugins declare what differs
(undecorated experts, split dense MLPs, parallel experts); this engine defuses what they detect.
"""

from __future__ import annotations

import logging

from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout, read_experts_layout
from defuser.engine.dense import split_dense_mlp
from defuser.engine.experts import DefusedExperts
from defuser.engine.parallel import DefusedParallelExperts
from defuser.hookspecs import hookimpl
from defuser.plugin_info import PluginInfo

__all__ = ["GENERIC_PLUGIN_NAME", "GenericEngine", "defuse", "dense_layout_of"]

logger = logging.getLogger(__name__)

GENERIC_PLUGIN_NAME = "generic"

_DEFAULT_DENSE = DenseLayout()


def dense_layout_of(module: nn.Module, layout: DenseLayout = _DEFAULT_DENSE) -> DenseLayout | None:
    """``layout`` when ``module`` holds a fused gate-up ``nn.Linear`` under its name, else None."""
    fused = module._modules.get(layout.fused_name)
    if isinstance(fused, nn.Linear) and fused.out_features % 2 == 0:
        return layout
    return None


def defuse(candidate: Candidate) -> nn.Module:
    """Defuse ``candidate`` with the generic engine and return what takes its place."""
    if candidate.kind == "dense":
        assert isinstance(candidate.layout, DenseLayout)
        return split_dense_mlp(candidate.module, candidate.layout)
    if candidate.kind == "parallel":
        assert isinstance(candidate.layout, ParallelLayout)
        return DefusedParallelExperts(candidate.module, candidate.layout, candidate.path)
    assert isinstance(candidate.layout, ExpertsLayout)
    return DefusedExperts.from_fused(candidate.module, candidate.layout)


class GenericEngine:
    """Hook implementations of the generic engine (registered as plugin ``generic``)."""

    @hookimpl
    def defuser_plugin_info(self) -> PluginInfo:
        return PluginInfo(
            name=GENERIC_PLUGIN_NAME,
            priority=-1000,
            description="experts decorated with @use_experts_implementation",
        )

    @hookimpl(trylast=True)
    def defuser_detect_candidate(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        layout = read_experts_layout(module)
        if layout is not None:
            return Candidate(path, module, "experts", GENERIC_PLUGIN_NAME, layout, model_type, generic=True)
        return None

    @hookimpl(trylast=True)
    def defuser_defuse_candidate(self, candidate: Candidate) -> nn.Module | None:
        return defuse(candidate)
