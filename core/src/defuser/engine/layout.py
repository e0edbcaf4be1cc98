"""Slicing fused expert tensors into per-expert ``nn.Linear`` weights, and joining them back.

Slices are views of the fused storage whenever the layout allows (concatenated,
non-transposed), so splitting costs no weight bytes; other layouts are copied once per
projection of a module, on the tensor's own device.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from defuser.engine.candidates import ExpertsLayout, ParallelLayout, resolve_tensor

if TYPE_CHECKING:
    from defuser.engine.inplace import Relayout

__all__ = [
    "Consumed",
    "ExpertWeights",
    "FusedTensors",
    "blank_module",
    "collector_paused",
    "dense_copy",
    "dense_per_expert",
    "empty_linears",
    "expert_weights",
    "fused_tensors",
    "join_gate_up",
    "linear_from",
    "orient",
    "split_gate_up",
    "stacked_expert_weights",
]


@dataclass
class FusedTensors:
    """The fused tensors of one experts module, detached (the layout says how to read them).
    :func:`stacked_expert_weights` clears a field once its tensor is consumed."""

    first: torch.Tensor  # gate_up (gated), up (not gated) or gate (separate gate and up)
    down: torch.Tensor
    second: torch.Tensor | None = None  # up, when gate and up are separate tensors
    first_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    # requires_grad of each fused tensor, by field name: every per-expert weight takes the
    # flag of the fused tensor it comes from.
    requires_grad: dict[str, bool] = field(default_factory=dict)

    def grads_of(self, projection: str) -> tuple[bool, bool]:
        """``(weight, bias)`` requires_grad of per-expert ``projection`` ("gate", "up", "down")."""
        if projection == "down":
            weight, bias = "down", "down_bias"
        else:
            separate_up = projection == "up" and "second" in self.requires_grad
            weight, bias = ("second" if separate_up else "first"), "first_bias"
        return self.requires_grad.get(weight, False), self.requires_grad.get(bias, False)


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
    names = {"first": layout.first_name, "down": layout.down_name}
    if layout.separate_gate_up:
        names["second"] = layout.up_name
    if layout.has_bias:
        names.update(first_bias=f"{layout.first_name}_bias", down_bias=f"{layout.down_name}_bias")
    found = {role: _tensor(module, name) for role, name in names.items()}
    return FusedTensors(
        **{role: tensor.detach() for role, tensor in found.items()},
        requires_grad={role: tensor.requires_grad for role, tensor in found.items()},
    )


# Columns per block of a transposing copy on the CPU: measured best on this project's machines
# (8 to 64 all beat one pass; 16 was fastest at both benchmark sizes).
_COPY_COLUMNS = 16


def dense_copy(view: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``view`` on its own device.  On the CPU, a view whose last dimension
    is strided (a transpose) is copied a block of columns at a time: the source rows being read
    then stay in cache, which makes large transposing copies about twice as fast as one pass."""
    if view.device.type != "cpu" or view.ndim < 2 or view.stride(-1) == 1 or view.shape[-1] <= _COPY_COLUMNS:
        return view.contiguous()
    out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    for start in range(0, view.shape[-1], _COPY_COLUMNS):
        out[..., start : start + _COPY_COLUMNS].copy_(view[..., start : start + _COPY_COLUMNS])
    return out


def dense_per_expert(stack: torch.Tensor) -> torch.Tensor:
    """``stack`` if each ``stack[e]`` is already dense (a view is enough), else one copy of the
    whole stack, made on its own device: one copy per projection per module, not per expert."""
    if stack.ndim < 3:  # biases [E, out]
        return stack if stack.stride(-1) == 1 else stack.contiguous()
    dense = stack.stride(-1) == 1 and stack.stride(-2) == stack.shape[-1]
    return stack if dense else dense_copy(stack)


def split_gate_up(
    stack: torch.Tensor, layout: ExpertsLayout | ParallelLayout, dim: int = -2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split stacked gate-up rows (``dim``: -2 for weights ``[E, 2I, H]``, -1 for biases) into
    ``(gate, up)`` named by meaning, each dense per expert; inverse of :func:`join_gate_up`."""
    size = stack.shape[dim] // 2
    if layout.is_concatenated:
        first, second = stack.narrow(dim, 0, size), stack.narrow(dim, size, size)
        gate, up = (first, second) if layout.gate_first else (second, first)
        return dense_per_expert(gate), dense_per_expert(up)
    # Interleaved rows cannot be views: de-interleave both halves in one pass over the
    # source, ``[E, ..., I, 2, ...] -> [E, 2, ..., I, ...]``, each half then dense per expert.
    dim = dim % stack.ndim
    halves = dense_copy(stack.unflatten(dim, (size, 2)).movedim(dim + 1, 1))
    first, second = halves[:, 0], halves[:, 1]
    return (first, second) if layout.gate_first else (second, first)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back as it was after; blocks nest).

    Defusing makes tens of thousands of modules, each with a dozen containers the collector
    tracks; left on, it traverses the whole growing model again and again while they are
    made (measured: most of a zero-copy conversion's time on a 61-layer model).  Modules make
    no reference cycles to collect; what becomes garbage is freed by reference counting as
    before, and any cycle is collected once the collector runs again.

    On leaving, the youngest generation (what the block made) is collected at once: left to
    the collector, the allocation count the block ran up sets off its next automatic pass,
    which is then a full one over the whole process heap (measured: 60% of building
    DeepSeek-V3 defused on meta, where this costs a few milliseconds per experts module).
    The objects stay collectable as any others; later passes run as the collector decides.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


# The state ``nn.Module.__init__`` leaves, split into plain values (shared) and a maker for
# each of its containers, called per module: an empty container is made anew (cheaper than a
# copy), a filled one copied.
_BLANK_STATE = vars(nn.Module())
_BLANK_VALUES = {key: value for key, value in _BLANK_STATE.items() if not isinstance(value, (dict, set, list))}
_BLANK_CONTAINERS = tuple(
    (key, value.copy if value else type(value))
    for key, value in _BLANK_STATE.items()
    if isinstance(value, (dict, set, list))
)
# Setting an instance's whole ``__dict__`` in one C call (``nn.Module.__setattr__`` would
# route ``module.__dict__ = ...`` through its Python checks).
_set_instance_dict = nn.Module.__dict__["__dict__"].__set__
_new_instance = object.__new__


def _blank_state() -> dict:
    """A new ``__dict__`` in the state ``nn.Module.__init__`` leaves (new containers)."""
    state = _BLANK_VALUES.copy()
    for key, make in _BLANK_CONTAINERS:
        state[key] = make()
    return state


def blank_module(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` in the state ``nn.Module.__init__`` leaves, without running any
    ``__init__``: a blank module's plain values and new empty containers of the same types."""
    # Module.__init__ costs ~15 us; a zero-copy conversion builds thousands of modules.
    module = cls.__new__(cls)
    made = module.__dict__  # empty, unless the class's own __new__ set something: kept
    _set_instance_dict(module, {**made, **_blank_state()} if made else _blank_state())
    return module


def _parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """``nn.Parameter(tensor, requires_grad)``; for a plain tensor the C call it makes, without
    its Python frame (tensor subclasses go through ``nn.Parameter`` and their own rules)."""
    if type(tensor) is torch.Tensor:
        return torch.Tensor._make_subclass(nn.Parameter, tensor, requires_grad)
    return nn.Parameter(tensor, requires_grad=requires_grad)


def _blank_linear(weight: nn.Parameter, bias: nn.Parameter | None, in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` (already Parameters), in the state
    ``nn.Linear.__init__`` leaves, without running it."""
    layer = _new_instance(nn.Linear)
    state = _blank_state()
    state["in_features"], state["out_features"] = in_features, out_features
    state["_parameters"]["weight"] = weight
    state["_parameters"]["bias"] = bias
    _set_instance_dict(layer, state)
    return layer


def empty_linears(count: int, weight: torch.Tensor, bias: torch.Tensor | None) -> list[nn.Linear]:
    """``count`` new ``nn.Linear`` modules shaped like ``weight`` (``[out, in]``) and ``bias``,
    their tensors made under the caller's device context and left uninitialised (the
    checkpoint loader or transformers' weight initialisation fills them); ``requires_grad`` as
    ``nn.Linear`` gives it.  On the meta device all ``count`` weights are made from one meta
    tensor (meta tensors hold no bytes; each Linear still has its own Parameter objects, with
    their own flags and metadata, as separate ``torch.empty`` calls would give); on any other
    device each tensor is its own allocation, as ``nn.Linear.__init__`` makes it, so no two
    Linears share storage."""
    if count == 0:
        return []
    out_features, in_features = weight.shape
    first = torch.empty(out_features, in_features, dtype=weight.dtype)
    first_bias = None if bias is None else torch.empty(out_features, dtype=bias.dtype)
    if first.is_meta:
        weights: list[torch.Tensor] = [first] * count
        biases: list[torch.Tensor | None] = [first_bias] * count
    else:
        weights = [first] + [torch.empty(out_features, in_features, dtype=weight.dtype) for _ in range(count - 1)]
        biases = [first_bias] + [
            None if bias is None else torch.empty(out_features, dtype=bias.dtype) for _ in range(count - 1)
        ]
    # The features are passed in: under a device context every ``tensor.shape`` goes through
    # its Python ``__torch_function__``.
    return [
        _blank_linear(
            _parameter(layer_weight, True),
            None if layer_bias is None else _parameter(layer_bias, True),
            in_features,
            out_features,
        )
        for layer_weight, layer_bias in zip(weights, biases, strict=True)
    ]


def linear_from(
    weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool, bias_requires_grad: bool | None = None
) -> nn.Linear:
    """Wrap existing tensors (views included) in an ``nn.Linear`` without allocating anything;
    the bias takes ``requires_grad`` unless ``bias_requires_grad`` says otherwise."""
    # nn.Linear.__init__ would create and initialise throwaway tensors (even on meta); at
    # hundreds of experts per layer that dominates a zero-copy conversion, so set the same
    # state directly.
    if bias_requires_grad is None:
        bias_requires_grad = requires_grad
    out_features, in_features = weight.shape
    return _blank_linear(
        _parameter(weight, requires_grad),
        None if bias is None else _parameter(bias, bias_requires_grad),
        in_features,
        out_features,
    )


def _shares_storage(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


# Told, for a fused tensor that was copied, which one it was ("first", "second", "down") and
# how to rebuild it from the copies, once nothing here holds it any more.
Consumed = Callable[[str, Callable[[], torch.Tensor]], None]


def stacked_expert_weights(
    tensors: FusedTensors,
    layout: ExpertsLayout,
    consumed: Consumed | None = None,
    relayout: Relayout | None = None,
) -> ExpertWeights:
    """All experts' weights stacked ``[E, out, in]`` (biases ``[E, out]``) in ``nn.Linear``
    orientation: views of the fused storage where the layout allows, else one copy per
    projection of the whole module (transposed or interleaved layouts), the largest first.
    After each copy, ``consumed`` (when given) is told, so the caller may release the fused
    tensor before the next copy is made.  ``relayout`` (when given) is offered each tensor that
    needs a copy first: where it re-lays the tensor out in its own storage, the weights are
    views of that instead (see :mod:`defuser.engine.inplace`)."""
    experts = layout.num_experts

    def stack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(experts, -1, tensor.shape[-1]) if layout.flattened else tensor

    def relaid(role: str, transposed: bool, split: bool) -> tuple[torch.Tensor, ...] | None:
        if relayout is None:
            return None
        deinterleave = split and not layout.is_concatenated
        stacked = relayout(role, getattr(tensors, role), transposed, deinterleave)
        if stacked is None:
            return None
        setattr(tensors, role, None)
        if deinterleave:  # [E, 2, I, ...]: the even rows first
            return (stacked[:, 0], stacked[:, 1]) if layout.gate_first else (stacked[:, 1], stacked[:, 0])
        return split_gate_up(stacked, layout, dim=1) if split else (stacked,)

    def take(role: str, transposed: bool, split: bool) -> tuple[torch.Tensor, ...]:
        fused = getattr(tensors, role)
        view = orient(stack(fused), transposed)[:experts]
        if not _is_view_layout(view, split, layout):
            del view  # in place needs the engine's own references on the storage only
            in_place = relaid(role, transposed, split)
            if in_place is not None:
                return in_place
            view = orient(stack(fused), transposed)[:experts]
        result = split_gate_up(view, layout, dim=-2) if split else (dense_per_expert(view),)
        copied = not any(_shares_storage(part, fused) for part in result)
        if consumed is None or not copied or layout.flattened or fused.shape[0] != experts:
            return result
        shape, stride, dtype, device = fused.shape, fused.stride(), fused.dtype, fused.device
        setattr(tensors, role, None)
        del fused, view

        def rebuild() -> torch.Tensor:
            # The copies are a permutation of the fused tensor: written back through the same view.
            out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            target = orient(out, transposed)
            target.copy_(join_gate_up(*result, layout, dim=-2) if split else result[0])
            return out

        consumed(role, rebuild)
        return result

    down_bias, first_bias = tensors.down_bias, tensors.first_bias
    if tensors.second is not None:
        (gate,) = take("first", layout.is_transposed, split=False)
        (up,) = take("second", layout.is_transposed, split=False)
        (down,) = take("down", layout.transposed_down, split=False)
        return ExpertWeights(gate, up, down, down_bias=down_bias)
    if not layout.has_gate:
        (up,) = take("first", layout.is_transposed, split=False)
        (down,) = take("down", layout.transposed_down, split=False)
        return ExpertWeights(None, up, down, None, first_bias, down_bias)
    gate, up = take("first", layout.is_transposed, split=True)
    (down,) = take("down", layout.transposed_down, split=False)
    gate_bias, up_bias = None, None
    if first_bias is not None:
        in_place = None if layout.is_concatenated else relaid("first_bias", False, split=True)
        gate_bias, up_bias = in_place or split_gate_up(first_bias, layout, dim=-1)
    return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias)


def _is_view_layout(view: torch.Tensor, split: bool, layout: ExpertsLayout) -> bool:
    """True when the per-expert weights of ``view`` (``[E, out, in]``) are views as they are."""
    dense = view.stride(-1) == 1 and view.stride(-2) == view.shape[-1]
    return dense and (not split or layout.is_concatenated)


def expert_weights(stacked: ExpertWeights, index: int) -> ExpertWeights:
    """Expert ``index``'s weights: views into :func:`stacked_expert_weights`."""

    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[index]

    return ExpertWeights(
        pick(stacked.gate),
        pick(stacked.up),
        pick(stacked.down),
        pick(stacked.gate_bias),
        pick(stacked.up_bias),
        pick(stacked.down_bias),
    )


def orient(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Return ``weight`` in ``nn.Linear`` ``[out, in]`` orientation (a view)."""
    return weight.transpose(-1, -2) if transposed else weight


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
