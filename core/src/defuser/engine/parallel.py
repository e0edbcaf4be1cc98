"""Parallel experts: one stacked ``weight[E, out, in]`` applied to token groups of given sizes.

transformers 5.3 granite and aria, and jetmoe in every version, keep each projection of all
experts in one such module and do the routing in the parent.  :class:`DefusedParallelExperts`
holds a numbered module per expert instead, each with one ``nn.Linear`` named ``linear``
(``input_linear.3.linear``, the names ModelCloud's Defuser gives them and GPTQModel's
definitions use), and keeps the forward ``(inputs_sorted_by_expert, group_sizes) -> outputs``.
A GLU input projection stays one Linear per expert holding the gate and up rows as the stacked
weight did: the parent splits its output, so the math is the fused one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import ParallelLayout
from defuser.engine.experts import copy_plain_attributes
from defuser.engine.inplace import relayout_parameter
from defuser.engine.layout import dense_per_expert, linear_from, orient
from defuser.engine.skeleton import skeleton_of

__all__ = ["DefusedParallelExperts", "ParallelExpert", "parallel_weight"]


class ParallelExpert(nn.Module):
    """One expert of a parallel projection: ``linear(x)``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


def parallel_weight(module: nn.Module, layout: ParallelLayout) -> torch.Tensor | None:
    """The stacked 3D weight of a parallel-experts ``module``, or None."""
    weight = module._parameters.get(layout.weight_name)
    return weight if getattr(weight, "ndim", 0) == 3 else None


class DefusedParallelExperts(nn.ModuleList):
    """Per-expert form of a parallel-experts module; ``experts[i]`` is expert ``i``."""

    def __init__(self, fused: nn.Module, layout: ParallelLayout, path: str = ""):
        super().__init__()
        weight = parallel_weight(fused, layout)
        if weight is None:
            raise TypeError(f"{type(fused).__name__} has no stacked weight {layout.weight_name!r}")
        copy_plain_attributes(fused, self)
        self.__dict__["_fused_skeleton"] = skeleton_of(fused, [layout.weight_name])
        self.layout = layout
        self.defused_from = type(fused).__name__
        self.num_experts = weight.shape[0]
        grad = weight.requires_grad
        detached = weight.detach()
        # With cleanup_original a transposed stack is re-laid out in its own storage if it may.
        stacked = None
        if layout.transposed:
            stacked = relayout_parameter(fused, layout.weight_name, detached, self.num_experts, transposed=True)
        if stacked is None:
            stacked = dense_per_expert(orient(detached, layout.transposed))
        for index in range(self.num_experts):
            self._modules[str(index)] = ParallelExpert(linear_from(stacked[index], None, grad))

    # nn.Module's repr (with the extra_repr), not ModuleList's.
    __repr__ = nn.Module.__repr__

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> nn.Module:  # type: ignore[override]  # no slices: one expert per index
        return self._modules[str(index % self.num_experts)]

    def __iter__(self) -> Any:
        return (self._modules[str(index)] for index in range(self.num_experts))

    def forward(self, inputs: torch.Tensor, group_sizes: Any) -> torch.Tensor:
        if isinstance(group_sizes, torch.Tensor):
            group_sizes = group_sizes.tolist()
        groups = inputs.split(list(group_sizes), dim=0)
        return torch.cat([expert(group) for expert, group in zip(self, groups, strict=True)], dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, defused_from={self.defused_from}"
