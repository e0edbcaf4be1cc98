"""Core's own plugin: the generic engine, asked last for every hook.

It detects any experts module that ``@use_experts_implementation`` decorated, from the flags
the decorator records, and defuses it, so a family transformers adds tomorrow is handled
without a plugin, before load too (``replace_fused_blocks`` of a model type no plugin claims).
A decorated module the flags do not fully describe (a subclass overriding ``forward``, tensors
they do not name) is refused (see :mod:`defuser.engine.contract`).  A dense MLP whose
``gate_up_proj`` is one ``nn.Linear`` is left as it is (it is already a plain Linear;
quantizers and tools that follow ModelCloud's Defuser expect it there) unless a plugin
declares its class in ``dense_classes``.  Plugins declare what differs (undecorated experts,
split dense MLPs, parallel experts); this engine defuses what they detect.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, read_experts_layout
from defuser.engine.contract import contract_refusal
from defuser.engine.kinds import KINDS
from defuser.hookspecs import hookimpl
from defuser.plugin_info import PluginInfo, TypeSupport

if TYPE_CHECKING:
    from defuser.engine.preload import PreloadPlan

__all__ = ["GENERIC_PLUGIN_NAME", "TESTED_TYPES", "GenericEngine", "defuse", "dense_layout_of"]

logger = logging.getLogger(__name__)

GENERIC_PLUGIN_NAME = "generic"

# Model types no plugin claims that the generic engine alone handles, as tested (the README
# table's "generic" rows; the census and the save-and-reload test check each one).  Any other
# decorated class of any release is handled the same way, untested until it is listed here.
TESTED_TYPES = (
    TypeSupport("kolibri1_1", min_transformers="5.25.0"),
    TypeSupport("minicpm5_moe", min_transformers="5.25.0"),
    TypeSupport("param2moe", min_transformers="5.25.0", notes="GLM-4-MoE model classes"),
)

_DEFAULT_DENSE = DenseLayout()


def dense_layout_of(module: nn.Module, layout: DenseLayout = _DEFAULT_DENSE) -> DenseLayout | None:
    """``layout`` when ``module`` holds a fused gate-up ``nn.Linear`` under its name, else None."""
    fused = module._modules.get(layout.fused_name)
    if isinstance(fused, nn.Linear) and fused.out_features % 2 == 0:
        return layout
    return None


def defuse(candidate: Candidate) -> nn.Module:
    """Defuse ``candidate`` with the generic engine and return what takes its place."""
    return KINDS[candidate.kind].defuse(candidate)


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
            refusal = contract_refusal(module, layout)
            return Candidate(
                path, module, "experts", GENERIC_PLUGIN_NAME, layout, model_type, generic=True, refusal=refusal
            )
        return None

    @hookimpl(trylast=True)
    def defuser_preload_plan(self, model_type: str) -> PreloadPlan | None:
        # Asked only for model types no plugin claims (see DefuserPluginManager.preload_plan).
        from defuser.engine.preload import decorated_experts_classes, fused_dense_classes
        from defuser.family import preload_plan_for

        plan = preload_plan_for(model_type)
        if plan is None:
            return None
        for name in plan.modeling_modules:
            module = importlib.import_module(name)
            if decorated_experts_classes(module) or fused_dense_classes(module):
                return plan
        return None

    @hookimpl(trylast=True)
    def defuser_defuse_candidate(self, candidate: Candidate) -> nn.Module | None:
        return defuse(candidate)
