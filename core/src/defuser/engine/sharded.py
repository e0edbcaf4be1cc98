"""Defused experts under transformers' tensor-parallel plans: the forward that reduces exactly
what is sharded.

A tensor-parallel plan puts a module style on the experts module (``moe_tp_experts``) that sums
the experts' output over the ``tp`` ranks, because each rank computed its slice of every
expert.  On defused experts that sum is right only when the per-expert ``nn.Linear`` weights are
sharded the same way (gate and up column-wise, down row-wise); on replicated weights it would
count the output once per rank.  :func:`install_experts_tp_forward` therefore decides from the
weights themselves, at each call: replicated weights run as they are, anything else is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from defuser.engine.distributed import DistributedPlanError, is_dtensor

__all__ = ["install_experts_tp_forward", "tp_weights_state"]

logger = logging.getLogger(__name__)

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def tp_weights_state(module: nn.Module, path: str = "") -> str:
    """``"replicated"`` when no per-expert weight of ``module`` is a DTensor; raises
    :class:`DistributedPlanError` naming the module otherwise."""
    sharded = []
    for index, expert in enumerate(module):
        for name in _PROJECTIONS:
            linear = expert._modules.get(name)
            if linear is None:
                continue
            for tensor_name, tensor in linear._parameters.items():
                if is_dtensor(tensor):
                    sharded.append(f"{index}.{name}.{tensor_name}")
    if not sharded:
        return "replicated"
    where = path or type(module).__name__
    raise DistributedPlanError(
        f"{where}: per-expert weights {', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''} are sharded "
        "by a tensor-parallel plan, which defuser cannot run exactly here"
    )


def install_experts_tp_forward(module: nn.Module, mesh: Any) -> nn.Module:
    """Wrap ``module.forward`` (a defused experts module named by a tensor-parallel experts style)
    so that it never sums replicated outputs over the ranks (see the module docstring)."""
    inner = module.forward

    def defused_experts_tp_forward(*args: Any, **kwargs: Any) -> Any:
        tp_weights_state(module)
        return inner(*args, **kwargs)

    module.forward = defused_experts_tp_forward
    module.__dict__["_defuser_tp_mesh"] = mesh
    return module
