"""Dense MLPs with one fused ``gate_up_proj`` Linear, split into ``gate_proj`` + ``up_proj``.

The MLP keeps its own class and forward.  Its ``gate_up_proj`` attribute becomes a small
unregistered callable that runs the two new Linears and joins their outputs in the fused
order, so every variant of the forward (adapters added to the fused output, reversed halves,
dropout, norms) stays exact while the state dict and hooks see only ``gate_proj`` and
``up_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from defuser.engine.candidates import DenseLayout

__all__ = ["JoinedGateUp", "join_dense_mlp", "split_dense_mlp", "split_gate_up_linear"]


class JoinedGateUp:
    """Stands where the fused Linear stood: ``gate_up_proj(x) == cat(first(x), second(x))``.

    Not an ``nn.Module`` on purpose: it holds references to the MLP's own ``gate_proj`` and
    ``up_proj`` children, which stay the only registered (saved, hooked) modules.
    """

    def __init__(self, owner: nn.Module, layout: DenseLayout, fused_skeleton: nn.Linear | None = None):
        self._owner = owner
        self.layout = layout
        # The fused Linear without its tensors, for fusing back (defuser.engine.fuse).
        self.fused_skeleton = fused_skeleton

    def _halves(self) -> tuple[nn.Linear, nn.Linear]:
        gate, up = self._owner.gate_proj, self._owner.up_proj
        return (gate, up) if self.layout.gate_first else (up, gate)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        first, second = self._halves()
        return torch.cat((first(hidden_states), second(hidden_states)), dim=-1)

    @property
    def in_features(self) -> int:
        return self._owner.gate_proj.in_features

    @property
    def out_features(self) -> int:
        return 2 * self._owner.gate_proj.out_features

    def __repr__(self) -> str:
        order = "gate_proj, up_proj" if self.layout.gate_first else "up_proj, gate_proj"
        return f"JoinedGateUp(cat({order}))"


def split_gate_up_linear(fused: nn.Linear, layout: DenseLayout, materialize: bool) -> tuple[nn.Linear, nn.Linear]:
    """Build ``(gate_proj, up_proj)`` from a fused Linear: views of its weight when
    ``materialize``; otherwise fresh Linears under the caller's device context."""
    half = fused.out_features // 2
    has_bias = fused.bias is not None
    if not materialize:
        make = lambda: nn.Linear(fused.in_features, half, bias=has_bias, dtype=fused.weight.dtype)  # noqa: E731
        return make(), make()
    halves = []
    for part in range(2):
        layer = nn.Linear(fused.in_features, half, bias=has_bias, device="meta")
        rows = slice(part * half, (part + 1) * half)
        layer.weight = nn.Parameter(fused.weight.detach()[rows], requires_grad=fused.weight.requires_grad)
        if has_bias:
            layer.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=fused.bias.requires_grad)
        halves.append(layer)
    first, second = halves
    return (first, second) if layout.gate_first else (second, first)


def split_dense_mlp(mlp: nn.Module, layout: DenseLayout, materialize: bool = True) -> nn.Module:
    """Split ``mlp``'s fused gate-up Linear in place and return ``mlp``."""
    from defuser.engine.fuse import skeleton_of

    fused = getattr(mlp, layout.fused_name)
    if not isinstance(fused, nn.Linear) or fused.out_features % 2:
        raise TypeError(f"{type(mlp).__name__}.{layout.fused_name} is not a fused gate-up nn.Linear")
    gate_proj, up_proj = split_gate_up_linear(fused, layout, materialize)
    joined = JoinedGateUp(mlp, layout, skeleton_of(fused, ["weight", "bias"]))
    # Every new piece is built before the module changes, so a failure above leaves it as it
    # was.  The halves take the fused Linear's place in the child order (and state dict).
    _replace_children(mlp, {layout.fused_name: {"gate_proj": gate_proj, "up_proj": up_proj}})
    object.__setattr__(mlp, layout.fused_name, joined)
    return mlp


def join_dense_mlp(mlp: nn.Module, fused: nn.Linear) -> nn.Module:
    """Undo :func:`split_dense_mlp`: ``fused`` takes the place of ``gate_proj`` and ``up_proj``."""
    joined = next(value for value in vars(mlp).values() if isinstance(value, JoinedGateUp))
    name = joined.layout.fused_name
    _replace_children(mlp, {"gate_proj": {name: fused}, "up_proj": {}})
    del mlp.__dict__[name]
    original = type(mlp).__dict__.get("_defuser_original")
    if original is not None:  # built by a pre-load patched class
        mlp.__class__ = original
    return mlp


def _replace_children(module: nn.Module, replacements: dict[str, dict[str, nn.Module]]) -> None:
    children: dict[str, nn.Module | None] = {}
    for name, child in module._modules.items():
        if name in replacements:
            children.update(replacements[name])
        else:
            children[name] = child
    module.__dict__["_modules"] = children
