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

from defuser.engine.candidates import ExpertsLayout, read_experts_layout, resolve_tensor
from defuser.engine.compiled import grouped_experts_forward
from defuser.engine.inplace import in_place_relayout
from defuser.engine.layout import (
    Consumed,
    ExpertWeights,
    blank_module,
    collector_paused,
    empty_linears,
    expert_weights,
    fused_tensors,
    join_gate_up,
    linear_from,
    stacked_expert_weights,
)
from defuser.engine.pickling import StockFunction, reduce_generated, restored_state
from defuser.engine.skeleton import skeleton_of
from defuser.engine.transaction import consumed_releaser
from defuser.engine.weight_init import initializing_weights, install_weight_init_window

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "DefusedExperts",
    "ExpertMLP",
    "GateActivation",
    "IdentityExpert",
    "combine_in_expert_order",
    "copy_plain_attributes",
    "defused_class_for",
    "expert_major_forward",
    "per_expert_forward",
    "register_experts_implementation",
    "weighted_all_forward",
]

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "defuser"

# Plain attributes of the fused module that must not travel to the defused one: an instance
# ``forward`` (set by accelerate's hooks, or any wrapper) is bound to the fused module.
_NOT_COPIED = frozenset({"training", "forward"})


def copy_plain_attributes(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the public plain attributes of ``source`` (``config``, ``num_experts``,
    ...), so code reading them off the fused module keeps working."""
    for name, value in vars(source).items():
        if not name.startswith("_") and name not in _NOT_COPIED:
            object.__setattr__(target, name, value)


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

    def __getstate__(self) -> dict[str, Any]:
        # The gate is the stock class's function: pickled by name, which finds it while
        # replace_fused_blocks has the class replaced too (see defuser.engine.pickling).
        state = dict(super().__getstate__())
        if state.get("_gate_fn") is not None:
            state["_gate_fn"] = StockFunction(state["_gate_fn"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(restored_state(state))


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
        self._hold(gate_proj, up_proj, down_proj, act_fn)

    @classmethod
    def of(cls, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> ExpertMLP:
        """The same as ``ExpertMLP(...)`` without ``nn.Module.__init__`` (built once per expert)."""
        expert = blank_module(cls)
        expert._hold(gate_proj, up_proj, down_proj, act_fn)
        return expert

    def _hold(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: Any) -> None:
        # What attribute assignment would do, minus nn.Module's per-assignment checks.
        modules = self._modules
        if gate_proj is not None:
            modules["gate_proj"] = gate_proj
        modules["up_proj"] = up_proj
        modules["down_proj"] = down_proj
        if isinstance(act_fn, nn.Module):
            modules["act_fn"] = act_fn
        else:
            self.__dict__["act_fn"] = act_fn

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


class IdentityExpert(nn.Module):
    """An identity ("zero") expert: routed to like the others, returns its input unchanged.
    Its ``identity`` child marks it (the name ModelCloud's Defuser gives it)."""

    def __init__(self) -> None:
        super().__init__()
        self.identity = nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.identity(hidden_states)


def _releasing(fused: nn.Module, layout: ExpertsLayout) -> Consumed | None:
    """Where the caller allows it (``convert_model(..., cleanup_original=True)``), release each
    fused weight of ``fused`` once copied (see :func:`stacked_expert_weights`)."""
    names = {"first": layout.first_name, "second": layout.up_name, "down": layout.down_name}

    def consumed(role: str, rebuild: Callable[[], torch.Tensor]) -> None:
        owner_path, _, leaf = names[role].rpartition(".")
        owner = fused.get_submodule(owner_path) if owner_path else fused
        release = consumed_releaser(owner)
        if release is not None:
            release(leaf, rebuild)

    return consumed if consumed_releaser(fused) is not None else None


def _attribute_path(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


class DefusedExperts(nn.ModuleList):
    """Per-expert replacement of a fused experts module; see the module docstring.

    A ``ModuleList`` of its experts (``isinstance(experts, nn.ModuleList)`` is how auto-round and
    llm-compressor recognise experts that are already linear), with the fused module's forward.
    """

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
        with collector_paused():  # thousands of modules made (see collector_paused)
            self._populate_paused(fused, layout, materialize)

    def _populate_paused(self, fused: nn.Module, layout: ExpertsLayout, materialize: bool) -> None:
        self._fused_shapes = {
            name: (tuple(tensor.shape), tensor.dtype) for name, tensor in fused.named_parameters(recurse=False)
        }
        copy_plain_attributes(fused, self)
        # For fusing back (defuser.engine.fuse): the fused module without its fused tensors,
        # kept outside the module tree so it is neither saved nor moved.
        names = [tensor.name for tensor in layout.tensors()]
        self.__dict__["_fused_skeleton"] = skeleton_of(fused, names)
        self.__dict__["_fused_tensor_shapes"] = {
            name: tuple(tensor.shape) for name in names if (tensor := resolve_tensor(fused, name)) is not None
        }
        self.layout = layout
        self.num_experts = layout.num_experts
        act_fn = _attribute_path(fused, layout.activation)
        gate_fn = type(fused)._apply_gate if layout.gate_style == "module" else None
        owner = types.SimpleNamespace(**{k: v for k, v in vars(self).items() if not k.startswith("_")})
        owner.act_fn = act_fn
        activation = GateActivation(act_fn, layout, gate_fn, owner) if layout.has_gate else act_fn
        if layout.has_post_expert_norm:
            self.post_expert_norm = fused.post_expert_norm
        tensors = fused_tensors(fused, layout)
        stacked = stacked_expert_weights(
            tensors,
            layout,
            _releasing(fused, layout) if materialize else None,
            in_place_relayout(fused, layout) if materialize else None,
        )
        if materialize:
            for index in range(layout.num_experts):
                weights = expert_weights(stacked, index)
                gate_proj = (
                    linear_from(weights.gate, weights.gate_bias, *tensors.grads_of("gate"))
                    if weights.gate is not None
                    else None
                )
                up_proj = linear_from(weights.up, weights.up_bias, *tensors.grads_of("up"))
                down_proj = linear_from(weights.down, weights.down_bias, *tensors.grads_of("down"))
                self._modules[str(index)] = ExpertMLP.of(gate_proj, up_proj, down_proj, activation)
        else:
            self._build_empty_experts(stacked, layout.num_experts, activation)
        # Identity ("zero") experts the fused class routes to past its last expert: numbered
        # modules too, so every routing index names a module (no weights, nothing saved).
        for index in range(layout.num_experts, layout.num_experts + layout.identity_experts):
            self._modules[str(index)] = IdentityExpert()

    def _build_empty_experts(self, stacked: ExpertWeights, count: int, activation: Any) -> None:
        """Built before load: ``count`` experts of new, uninitialised Linears shaped like expert
        0 of ``stacked`` (see :func:`empty_linears`), as the fused class leaves its
        ``torch.empty`` tensors: the checkpoint loader fills them, or transformers' weight
        initialisation does (it initialises every ``nn.Linear``).  ``nn.Linear.__init__`` would
        initialise each one (kaiming) only to be overwritten; at hundreds of experts per layer
        even its bookkeeping costs most of building a defused model, so the Linears of each
        projection are made together."""
        if count == 0:
            return
        shapes = expert_weights(stacked, 0)
        gates = empty_linears(count, shapes.gate, shapes.gate_bias) if shapes.gate is not None else [None] * count
        ups = empty_linears(count, shapes.up, shapes.up_bias)
        downs = empty_linears(count, shapes.down, shapes.down_bias)
        modules = self._modules
        for index, (gate_proj, up_proj, down_proj) in enumerate(zip(gates, ups, downs, strict=True)):
            modules[str(index)] = ExpertMLP.of(gate_proj, up_proj, down_proj, activation)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            shapes = self.__dict__.get("_fused_shapes", {})
            if name not in shapes or not initializing_weights():
                raise
        # transformers' weight init still reaches this class under the fused class's name
        # and touches the fused tensors: only there, a structure-only placeholder makes that
        # a no-op (see defuser.engine.weight_init).  Anywhere else fused names do not exist.
        shape, dtype = shapes[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time and no module attribute holds it: pickled as the class
        # defused_class_for makes for the stock class, rebuilt by it on load (see
        # defuser.engine.pickling).
        fused_class = type(self).fused_class
        if fused_class is None:
            return super().__reduce_ex__(protocol)
        return reduce_generated(
            self,
            type(self).class_factory(),
            fused_class,
            type(self).layout_overrides,
            stock_modules=("_fused_skeleton",),
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(restored_state(state))

    @classmethod
    def class_factory(cls) -> Callable[..., type[DefusedExperts]]:
        """What makes this class from the stock class and layout overrides when a pickled
        instance loads (a subclass adding behaviour, as expert-parallel holding does, names its own)."""
        return defused_class_for

    # -- sequence behaviour ---------------------------------------------------------------

    # nn.Module's repr: ModuleList's would list the routed experts only and drop the rest
    # (identity experts, a post-expert norm) and the extra_repr.
    __repr__ = nn.Module.__repr__

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self._modules[str(index)] for index in range(self.num_experts))

    def __getitem__(self, index: int | slice) -> nn.Module | list[nn.Module]:
        if isinstance(index, slice):
            return [self._modules[str(i)] for i in range(self.num_experts)[index]]
        # Routing indices past the experts name identity experts (LongCat), when there are any.
        routed = self.num_experts + self.layout.identity_experts
        if not -self.num_experts <= index < routed:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        return self._modules[str(index % self.num_experts if index < 0 else index)]

    # -- forward --------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        contract = self.layout.contract
        if contract == "expert_major":
            return expert_major_forward(self, hidden_states)
        if contract == "weighted_all":
            return weighted_all_forward(self, hidden_states, *args, **kwargs)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        # Families name the routing arguments differently (gpt_oss: router_indices, routing_weights).
        routing = list(args)
        for names in (("top_k_index", "router_indices"), ("top_k_weights", "routing_weights")):
            routing += [kwargs.pop(name) for name in names if name in kwargs]
        if len(routing) != 2 or kwargs:
            raise TypeError(f"{type(self).__name__}.forward expects hidden_states, top-k indices and weights")
        implementation = ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION, per_expert_forward)
        return implementation(self, hidden_states, *routing)

    def extra_repr(self) -> str:
        source = self.fused_class.__name__ if self.fused_class is not None else "?"
        return f"num_experts={self.num_experts}, defused_from={source}"


def per_expert_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Route tokens through per-expert ``nn.Linear`` modules.

    Tokens are grouped by expert with one stable sort; only experts that received tokens
    run; one host synchronisation reads all group sizes at once; results are written to
    their sorted slots and summed per token in increasing expert order, in the model's dtype,
    like transformers' eager loop (deterministic, no atomics).
    Indices ``>= num_experts`` (the expert-parallel sentinel) contribute nothing.  A fused
    module that reaches this function (``experts_implementation="defuser"`` set model-wide)
    runs its own eager forward, so the choice stays per module.
    """
    if not isinstance(module, DefusedExperts):
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)
    if torch.compiler.is_compiling():
        # No host read while compiling: the grouped dispatch as custom ops (plain experts).
        grouped = grouped_experts_forward(module, hidden_states, top_k_index, top_k_weights)
        if grouped is not None:
            return grouped
    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, shape[-1])
    top_k = top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    routed = module.num_experts + module.layout.identity_experts
    counts = torch.bincount(flat_index, minlength=routed)[:routed].tolist()
    sorted_inputs = hidden_states.index_select(0, order // top_k)
    sorted_outputs: torch.Tensor | None = None
    start = 0
    for index, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        # Past the experts: an identity ("zero") expert, which passes its input through.
        expert_out = module[index](sorted_inputs[start:end])
        if module.layout.has_post_expert_norm:
            if module.layout.post_expert_norm_by_expert:  # one scale per expert, chosen by id
                ids = torch.full((count,), min(index, module.num_experts - 1), device=expert_out.device)
                expert_out = module.post_expert_norm(expert_out, ids)
            else:
                expert_out = module.post_expert_norm(expert_out)
        if sorted_outputs is None:
            sorted_outputs = expert_out.new_zeros(order.shape[0], expert_out.shape[-1])
        sorted_outputs[start:end] = expert_out
        start = end
    if sorted_outputs is None:
        return torch.zeros_like(hidden_states).reshape(shape)
    return combine_in_expert_order(sorted_outputs, order, top_k_index, top_k_weights, hidden_states.dtype).reshape(
        shape
    )


def combine_in_expert_order(
    sorted_outputs: torch.Tensor,
    order: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Each token's weighted expert outputs (``sorted_outputs``, rows in ``order``, the stable
    sort of the flat routing indices), summed per token in increasing expert order: ``[T, H]``."""
    top_k = top_k_index.shape[-1]
    weighted = sorted_outputs * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    # Each token's contributions are added in increasing expert order, in the model's dtype,
    # as transformers' eager loop adds them: the result matches it bit for bit in bfloat16
    # too, and the order is fixed (no atomics).  Every sorted row goes straight to its slot
    # in that order: row ``t * top_k + r`` holds token t's r-th lowest expert.
    choices = top_k_index.reshape(-1, top_k)
    by_expert = choices.argsort(dim=-1, stable=True)
    rank = torch.empty_like(by_expert).scatter_(
        1, by_expert, torch.arange(top_k, device=by_expert.device).expand_as(by_expert)
    )
    slots = torch.arange(choices.shape[0], device=rank.device).unsqueeze(1) * top_k + rank
    destination = slots.reshape(-1).index_select(0, order)
    ordered = torch.empty_like(weighted, dtype=dtype)
    ordered.index_copy_(0, destination, weighted.to(dtype))
    ordered = ordered.view(-1, top_k, ordered.shape[-1])
    combined = ordered[:, 0]
    for slot in range(1, top_k):
        combined = combined + ordered[:, slot]
    return combined


def expert_major_forward(module: DefusedExperts, hidden_states: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` is ``[E*T, H]``, expert-major: block ``e`` goes through expert ``e``."""
    blocks = hidden_states.view(module.num_experts, -1, hidden_states.shape[-1])
    return torch.cat([expert(block) for expert, block in zip(module, blocks, strict=True)], dim=0)


def weighted_all_forward(module: DefusedExperts, hidden_states: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, scaled per token and expert before the down
    projection, summed over experts in float32 (the fused order of operations)."""
    shape = hidden_states.shape
    tokens = hidden_states.reshape(-1, shape[-1])
    scales = gammas.reshape(tokens.shape[0], module.num_experts, 1)
    total = None
    for index, expert in enumerate(module):
        hidden = expert.act_fn(expert.gate_proj(tokens), expert.up_proj(tokens)) * scales[:, index]
        out = expert.down_proj(hidden).float()
        total = out if total is None else total + out
    return total.to(hidden_states.dtype).view(shape)


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
    install_weight_init_window()
