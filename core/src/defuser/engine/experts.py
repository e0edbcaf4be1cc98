"""Defused experts: one ``nn.Linear`` per projection per expert, and their forward.

:class:`DefusedExperts` takes the place of a fused experts module.  It keeps the fused
module's contract (``forward(hidden_states, top_k_index, top_k_weights)``), its plain
attributes (``config``, ``num_experts``, ...) and its gate function, and behaves like a
sequence of experts: ``experts[i]``, ``len(experts)`` and iteration work.

The per-expert forward is registered in transformers' experts-implementation registry as
``"defuser"``, so it can be swapped for another kernel the same way transformers' own
backends are.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from defuser.engine.candidates import ExpertsLayout, read_experts_layout
from defuser.engine.layout import join_gate_up, linear_weight, orient, split_gate_up

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "DefusedExperts",
    "ExpertMLP",
    "GateActivation",
    "defused_class_for",
    "per_expert_forward",
    "register_experts_implementation",
]

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "defuser"

# Plain attributes of the fused module that must not travel to the defused one.
_NOT_COPIED = frozenset({"training"})


class GateActivation(nn.Module):
    """Combines one expert's gate and up outputs exactly as the fused class does.

    ``default`` is ``act(gate) * up``; ``module`` re-joins the halves in the fused order and
    calls the fused class's own ``_apply_gate`` (clamped, float32 or softcapped gates), so
    families with special gates need no code of their own.
    """

    def __init__(self, act_fn: nn.Module | None, layout: ExpertsLayout, gate_fn: Callable | None, owner: Any):
        super().__init__()
        self.act_fn = act_fn
        self.layout = layout
        self._gate_fn = gate_fn
        self._owner = owner

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is None:
            return self.act_fn(gate) * up
        return self._gate_fn(self._owner, join_gate_up(gate, up, self.layout))

    def extra_repr(self) -> str:
        return "own gate of the fused class" if self._gate_fn is not None else ""


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (no ``gate_proj`` when the
    family is not gated)."""

    def __init__(
        self,
        gate_proj: nn.Linear | None,
        up_proj: nn.Linear,
        down_proj: nn.Linear,
        act_fn: nn.Module,
    ):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    @property
    def is_gated(self) -> bool:
        """True when the expert has a gate projection."""
        return "gate_proj" in self._modules

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            hidden = self.act_fn(self.gate_proj(hidden_states), self.up_proj(hidden_states))
        else:
            hidden = self.act_fn(self.up_proj(hidden_states))
        return self.down_proj(hidden)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """Wrap existing tensors in an ``nn.Linear`` without allocating anything new."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return layer


def _empty_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """A new Linear built under the caller's device context (pre-load path)."""
    return nn.Linear(in_features, out_features, bias=bias, dtype=like.dtype)


class DefusedExperts(nn.Module):
    """Per-expert replacement of a fused experts module; see the module docstring."""

    fused_class: ClassVar[type[nn.Module] | None] = None
    layout_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any = None, *args: Any, **kwargs: Any):
        super().__init__()
        if self.fused_class is None:
            raise TypeError("DefusedExperts is built with DefusedExperts.from_fused(module)")
        # Built in place of the fused class (pre-load patching): learn the shapes from a
        # structure-only instance, then create fresh per-expert Linears under the caller's
        # device/dtype context so the checkpoint loader fills them.
        with torch.device("meta"):
            prototype = self.fused_class(config, *args, **kwargs)
        layout = read_experts_layout(prototype)
        if layout is None:
            raise TypeError(f"{self.fused_class.__name__} does not carry the experts layout flags")
        self._populate(prototype, layout.with_overrides(**self.layout_overrides), materialize=False)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_fused(cls, module: nn.Module, layout: ExpertsLayout) -> DefusedExperts:
        """Build the defused form of a loaded fused ``module``; weights are views of its
        tensors where the layout allows, copies otherwise.  ``module`` is not changed."""
        defused_cls = defused_class_for(type(module))
        instance = nn.Module.__new__(defused_cls)
        nn.Module.__init__(instance)
        instance._populate(module, layout, materialize=True)
        return instance

    def _populate(self, fused: nn.Module, layout: ExpertsLayout, materialize: bool) -> None:
        self._fused_shapes = {
            name: (tuple(tensor.shape), tensor.dtype) for name, tensor in fused.named_parameters(recurse=False)
        }
        for name, value in vars(fused).items():
            if not name.startswith("_") and name not in _NOT_COPIED:
                object.__setattr__(self, name, value)
        self.layout = layout
        self.num_experts = layout.num_experts
        act_fn = getattr(fused, "act_fn", None)
        gate_fn = type(fused)._apply_gate if layout.gate_style == "module" else None
        owner = types.SimpleNamespace(**{k: v for k, v in vars(self).items() if not k.startswith("_")})
        owner.act_fn = act_fn
        activation = GateActivation(act_fn, layout, gate_fn, owner) if layout.has_gate else act_fn
        if layout.has_post_expert_norm:
            self.post_expert_norm = fused.post_expert_norm
        build = self._expert_views if materialize else self._expert_shells
        tensors = self._fused_tensors(fused, layout)
        for index in range(layout.num_experts):
            self.add_module(str(index), build(tensors, layout, index, activation))

    @staticmethod
    def _fused_tensors(fused: nn.Module, layout: ExpertsLayout) -> dict[str, torch.Tensor | None]:
        first = layout.gate_up_name if layout.has_gate else layout.up_name
        tensors = {"first": getattr(fused, first), "down": getattr(fused, layout.down_name)}
        tensors["first_bias"] = getattr(fused, f"{first}_bias", None) if layout.has_bias else None
        tensors["down_bias"] = getattr(fused, f"{layout.down_name}_bias", None) if layout.has_bias else None
        return tensors

    def _expert_views(self, tensors: dict, layout: ExpertsLayout, index: int, activation: nn.Module) -> ExpertMLP:
        grad = tensors["first"].requires_grad
        first = orient(tensors["first"].detach()[index], layout.is_transposed)
        first_bias = tensors["first_bias"].detach()[index] if tensors["first_bias"] is not None else None
        down = linear_weight(tensors["down"].detach()[index], layout.is_transposed)
        down_bias = tensors["down_bias"].detach()[index] if tensors["down_bias"] is not None else None
        if layout.has_gate:
            gate_w, up_w = split_gate_up(first, layout)
            gate_b, up_b = split_gate_up(first_bias, layout) if first_bias is not None else (None, None)
            gate_proj = _linear(gate_w, gate_b, grad)
        else:
            up_w, up_b, gate_proj = linear_weight(first, False), first_bias, None
        return ExpertMLP(gate_proj, _linear(up_w, up_b, grad), _linear(down, down_bias, grad), activation)

    def _expert_shells(self, tensors: dict, layout: ExpertsLayout, index: int, activation: nn.Module) -> ExpertMLP:
        first = orient(tensors["first"][index], layout.is_transposed)
        down = orient(tensors["down"][index], layout.is_transposed)
        intermediate = first.shape[0] // 2 if layout.has_gate else first.shape[0]
        hidden = first.shape[1]
        bias = layout.has_bias
        gate_proj = _empty_linear(hidden, intermediate, bias, first) if layout.has_gate else None
        up_proj = _empty_linear(hidden, intermediate, bias, first)
        down_proj = _empty_linear(down.shape[1], down.shape[0], bias, down)
        return ExpertMLP(gate_proj, up_proj, down_proj, activation)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            shapes = self.__dict__.get("_fused_shapes", {})
            if name not in shapes:
                raise
        # transformers' weight init still reaches this class under the fused class's name
        # and touches the fused tensors; a structure-only placeholder makes that a no-op,
        # and any real computation with it fails loudly.
        shape, dtype = shapes[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    # -- sequence behaviour ---------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self._modules[str(index)] for index in range(self.num_experts))

    def __getitem__(self, index: int | slice) -> ExpertMLP | list[ExpertMLP]:
        if isinstance(index, slice):
            return [self._modules[str(i)] for i in range(self.num_experts)[index]]
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        return self._modules[str(index % self.num_experts)]

    # -- forward --------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        implementation = ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION, per_expert_forward)
        return implementation(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        source = self.fused_class.__name__ if self.fused_class is not None else "?"
        return f"num_experts={self.num_experts}, defused_from={source}"


def per_expert_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Route tokens through per-expert ``nn.Linear`` modules.

    Tokens are grouped by expert with one stable sort; only experts that received tokens
    run; one host synchronisation reads all group sizes at once; results are written to
    their sorted slots and summed over top-k in a fixed order (deterministic, no atomics).
    Indices ``>= num_experts`` (the expert-parallel sentinel) contribute nothing.  A fused
    module that reaches this function (``experts_implementation="defuser"`` set model-wide)
    runs its own eager forward, so the choice stays per module.
    """
    if not isinstance(module, DefusedExperts):
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)
    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, shape[-1])
    top_k = top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    counts = torch.bincount(flat_index, minlength=module.num_experts)[: module.num_experts].tolist()
    sorted_inputs = hidden_states.index_select(0, order // top_k)
    sorted_outputs: torch.Tensor | None = None
    start = 0
    for index, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        expert_out = module[index](sorted_inputs[start:end])
        if module.layout.has_post_expert_norm:
            expert_out = module.post_expert_norm(expert_out)
        if sorted_outputs is None:
            sorted_outputs = expert_out.new_zeros(order.shape[0], expert_out.shape[-1])
        sorted_outputs[start:end] = expert_out
        start = end
    if sorted_outputs is None:
        return torch.zeros_like(hidden_states).reshape(shape)
    weighted = sorted_outputs * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    per_slot = torch.empty_like(weighted)
    per_slot[order] = weighted
    combined = per_slot.view(-1, top_k, per_slot.shape[-1]).sum(dim=1)
    return combined.to(hidden_states.dtype).reshape(shape)


_DEFUSED_CLASSES: dict[type[nn.Module], type[DefusedExperts]] = {}


def defused_class_for(fused_class: type[nn.Module], **layout_overrides: Any) -> type[DefusedExperts]:
    """The ``Defused<Name>`` class standing in for ``fused_class`` (one per class and overrides)."""
    if issubclass(fused_class, DefusedExperts):
        return fused_class
    key = fused_class if not layout_overrides else None
    if key is not None and key in _DEFUSED_CLASSES:
        return _DEFUSED_CLASSES[key]
    defused = type(
        f"Defused{fused_class.__name__}",
        (DefusedExperts,),
        {"fused_class": fused_class, "layout_overrides": dict(layout_overrides), "__module__": __name__},
    )
    if key is not None:
        _DEFUSED_CLASSES[key] = defused
    return defused


def register_experts_implementation() -> None:
    """Register :func:`per_expert_forward` in transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not per_expert_forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, per_expert_forward)
