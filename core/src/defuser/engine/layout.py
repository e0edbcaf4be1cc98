"""Slicing fused expert tensors into per-expert ``nn.Linear`` weights, and joining them back.

Slices are views of the fused storage whenever the layout allows (concatenated,
non-transposed), so splitting costs no weight bytes; other layouts are copied one slice at a
time on the tensor's own device.
"""

from __future__ import annotations

import torch

from defuser.engine.candidates import ExpertsLayout

__all__ = ["join_gate_up", "linear_weight", "orient", "split_gate_up"]


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
