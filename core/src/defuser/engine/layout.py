"""Slicing fused expert tensors into per-expert ``nn.Linear`` weights, and joining them back.

Slices are views of the fused storage whenever the layout allows (concatenated,
non-transposed), so splitting costs no weight bytes; other layouts are copied one slice at a
time on the tensor's own device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from defuser.engine.candidates import ExpertsLayout, resolve_tensor

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ExpertWeights",
    "FusedTensors",
    "expert_weights",
    "fused_tensors",
    "join_gate_up",
    "linear_weight",
    "orient",
    "split_gate_up",
]


@dataclass(frozen=True)
class FusedTensors:
    """The fused tensors of one experts module, detached (the layout says how to read them)."""

    first: torch.Tensor  # gate_up (gated), up (not gated) or gate (separate gate and up)
    down: torch.Tensor
    second: torch.Tensor | None = None  # up, when gate and up are separate tensors
    first_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    requires_grad: bool = False


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights in ``nn.Linear`` orientation (``gate`` is None when not gated)."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    tensor = resolve_tensor(module, name)
    if tensor is None:
        raise TypeError(f"{type(module).__name__} has no fused tensor {name!r}")
    return tensor


def fused_tensors(module: nn.Module, layout: ExpertsLayout) -> FusedTensors:
    """Collect ``module``'s fused tensors named by ``layout``."""
    if layout.separate_gate_up:
        first_name, second = layout.gate_name, _tensor(module, layout.up_name).detach()
    else:
        first_name, second = (layout.gate_up_name if layout.has_gate else layout.up_name), None
    first = _tensor(module, first_name)
    bias = (lambda name: _tensor(module, f"{name}_bias").detach()) if layout.has_bias else (lambda name: None)
    return FusedTensors(
        first=first.detach(),
        down=_tensor(module, layout.down_name).detach(),
        second=second,
        first_bias=bias(first_name),
        down_bias=bias(layout.down_name),
        requires_grad=first.requires_grad,
    )


def _expert_slice(tensor: torch.Tensor, layout: ExpertsLayout, index: int) -> torch.Tensor:
    if layout.flattened:
        tensor = tensor.view(layout.num_experts, -1, tensor.shape[-1])
    return tensor[index]


def expert_weights(tensors: FusedTensors, layout: ExpertsLayout, index: int) -> ExpertWeights:
    """Expert ``index``'s weights: views of the fused storage where the layout allows."""
    down = linear_weight(_expert_slice(tensors.down, layout, index), layout.transposed_down)
    down_bias = tensors.down_bias[index] if tensors.down_bias is not None else None
    first = orient(_expert_slice(tensors.first, layout, index), layout.is_transposed)
    first_bias = tensors.first_bias[index] if tensors.first_bias is not None else None
    if tensors.second is not None:
        up = linear_weight(_expert_slice(tensors.second, layout, index), layout.is_transposed)
        return ExpertWeights(_as_linear_weight(first), up, down, down_bias=down_bias)
    if not layout.has_gate:
        return ExpertWeights(None, _as_linear_weight(first), down, None, first_bias, down_bias)
    gate, up = split_gate_up(first, layout)
    gate_bias, up_bias = split_gate_up(first_bias, layout) if first_bias is not None else (None, None)
    return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)


def orient(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Return ``weight`` in ``nn.Linear`` ``[out, in]`` orientation (a view)."""
    return weight.transpose(-1, -2) if transposed else weight


def _as_linear_weight(tensor: torch.Tensor) -> torch.Tensor:
    # A strided view (transposed or interleaved) is copied once so the Linear owns dense
    # memory; a contiguous slice stays a view of the fused storage.
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def split_gate_up(fused: torch.Tensor, layout: ExpertsLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one expert's fused gate-up slice (weight ``[2I, H]`` or bias ``[2I]``, in Linear
    orientation) into ``(gate, up)`` named by meaning."""
    if layout.is_concatenated:
        first, second = fused.chunk(2, dim=0)
    else:
        first, second = fused[0::2], fused[1::2]
    gate, up = (first, second) if layout.gate_first else (second, first)
    return _as_linear_weight(gate), _as_linear_weight(up)


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, layout: ExpertsLayout, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`split_gate_up` along ``dim``: rebuild the fused order from halves."""
    first, second = (gate, up) if layout.gate_first else (up, gate)
    if layout.is_concatenated:
        return torch.cat((first, second), dim=dim)
    return _interleave(first, second, dim)


def _interleave(first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
    dim = dim % first.ndim
    stacked = torch.stack((first, second), dim=dim + 1)
    return stacked.flatten(dim, dim + 1)


def linear_weight(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """One expert's down/up weight in Linear orientation, a view where possible."""
    return _as_linear_weight(orient(tensor, transposed))
