"""Dense MLPs with one fused gate-up Linear, split into ``gate_proj`` + ``up_proj``.

A split MLP keeps its place, its plain attributes and its children other than the fused
Linear, whose place in the child order (and state dict) ``gate_proj`` and ``up_proj`` take.
Its class becomes ``<Name>`` again but a subclass of the stock one (one per stock class, so
``isinstance`` checks still hold) whose ``forward`` runs the stock forward with the fused name
read as "``gate_proj`` and ``up_proj`` joined in the fused order": every variant of the
forward (adapters added to the fused output, reversed halves, dropout, norms) stays exact,
while the module itself holds no fused name at all (``hasattr(mlp, "gate_up_proj")`` is
False).  :func:`split_dense_layout` tells a split MLP and its layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import DenseLayout
from defuser.engine.pickling import reduce_generated
from defuser.engine.skeleton import skeleton_of

__all__ = [
    "join_dense_mlp",
    "split_class_for",
    "split_dense_layout",
    "split_dense_mlp",
    "split_dense_skeleton",
    "split_gate_up_linear",
]

# Where a split MLP keeps its record (outside the module tree: neither saved nor moved).
_RECORD = "_defuser_split_dense"


@dataclass(frozen=True)
class _SplitRecord:
    layout: DenseLayout
    # The fused Linear without its tensors, for fusing back (defuser.engine.fuse).
    fused_skeleton: nn.Linear | None


def split_dense_layout(module: nn.Module) -> DenseLayout | None:
    """The layout of a dense MLP split by :func:`split_dense_mlp`, or None for any other module."""
    record = module.__dict__.get(_RECORD)
    return record.layout if isinstance(record, _SplitRecord) else None


def split_dense_skeleton(module: nn.Module) -> nn.Linear | None:
    """The tensor-free copy of the fused Linear a split MLP was made from, or None."""
    record = module.__dict__.get(_RECORD)
    return record.fused_skeleton if isinstance(record, _SplitRecord) else None


class _JoinedHalves:
    """What the stock forward reads under the fused name: ``cat(first(x), second(x))``."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: nn.Module, second: nn.Module):
        self._first = first
        self._second = second

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat((self._first(hidden_states), self._second(hidden_states)), dim=-1)


class _ForwardView:
    """The split MLP as its stock forward sees it: every attribute is the module's own, except
    the fused name, which answers the two halves joined.  Exists only during one forward."""

    __slots__ = ("_fused_name", "_joined", "_module")

    def __init__(self, module: nn.Module, layout: DenseLayout):
        gate, up = module._modules["gate_proj"], module._modules["up_proj"]
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_fused_name", layout.fused_name)
        object.__setattr__(self, "_joined", _JoinedHalves(gate, up) if layout.gate_first else _JoinedHalves(up, gate))

    def __getattr__(self, name: str) -> Any:
        if name == self._fused_name:
            return self._joined
        return getattr(self._module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)


def _split_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    layout = split_dense_layout(self)
    stock = type(self)._defuser_original
    if layout is None:  # not split (a config built it unfused): the stock forward as it is
        return stock.forward(self, *args, **kwargs)
    return stock.forward(_ForwardView(self, layout), *args, **kwargs)


def _split_reduce_ex(self: nn.Module, protocol: Any) -> Any:
    # The class is made at run time under the stock name, which names the stock class: pickled
    # as the class split_class_for makes for it, rebuilt by it on load (defuser.engine.pickling).
    return reduce_generated(self, split_class_for, type(self)._defuser_original)


_SPLIT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def split_class_for(stock: type[nn.Module]) -> type[nn.Module]:
    """The class of a split ``stock`` MLP: same name, a subclass of ``stock``, its own forward."""
    stock = getattr(stock, "_defuser_original", stock)
    split = _SPLIT_CLASSES.get(stock)
    if split is None:
        split = type(
            stock.__name__,
            (stock,),
            {
                "forward": _split_forward,
                "__reduce_ex__": _split_reduce_ex,
                "__module__": stock.__module__,
                "_defuser_original": stock,
            },
        )
        _SPLIT_CLASSES[stock] = split
    return split


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
    fused = mlp._modules.get(layout.fused_name)
    if not isinstance(fused, nn.Linear) or fused.out_features % 2:
        raise TypeError(f"{type(mlp).__name__}.{layout.fused_name} is not a fused gate-up nn.Linear")
    for name in ("gate_proj", "up_proj"):
        if name in mlp._modules or name in mlp.__dict__:
            raise TypeError(f"{type(mlp).__name__} already has a {name!r}; its {layout.fused_name} is not split")
    gate_proj, up_proj = split_gate_up_linear(fused, layout, materialize)
    record = _SplitRecord(layout, skeleton_of(fused, ["weight", "bias"]))
    split_class = split_class_for(type(mlp))
    # Every new piece is built before the module changes, so a failure above leaves it as it
    # was.  The halves take the fused Linear's place in the child order (and state dict).
    _replace_children(mlp, {layout.fused_name: {"gate_proj": gate_proj, "up_proj": up_proj}})
    mlp.__dict__[_RECORD] = record
    if not isinstance(mlp, split_class):  # a pre-load built MLP already has its split class
        mlp.__class__ = split_class
    return mlp


def join_dense_mlp(mlp: nn.Module, fused: nn.Linear) -> nn.Module:
    """Undo :func:`split_dense_mlp`: ``fused`` takes the place of ``gate_proj`` and ``up_proj``,
    and the MLP gets its stock class back."""
    layout = split_dense_layout(mlp)
    if layout is None:
        raise TypeError(f"{type(mlp).__name__} is not a split dense MLP")
    _replace_children(mlp, {"gate_proj": {layout.fused_name: fused}, "up_proj": {}})
    del mlp.__dict__[_RECORD]
    stock = getattr(type(mlp), "_defuser_original", None)
    if stock is not None:
        mlp.__class__ = stock
    return mlp


def _replace_children(module: nn.Module, replacements: dict[str, dict[str, nn.Module]]) -> None:
    children: dict[str, nn.Module | None] = {}
    for name, child in module._modules.items():
        if name in replacements:
            children.update(replacements[name])
        else:
            children[name] = child
    module.__dict__["_modules"] = children
