"""Descriptions of fused blocks: what detection finds and what defusion consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "Candidate",
    "DenseLayout",
    "ExpertsLayout",
    "FusedTensor",
    "FusedTensorRole",
    "ParallelLayout",
    "declared_experts_layout",
    "read_experts_layout",
    "resolve_tensor",
]

# Attributes that ``@use_experts_implementation`` sets on every instance it wraps (5.3.0
# already; ``is_concatenated`` and ``has_post_expert_norm`` came later and default off).
_DECORATOR_FLAGS = ("has_gate", "has_bias", "is_transposed")


# Which tensor of a fused block a :class:`FusedTensor` is.  Experts: ``gate_up`` (gate and up
# in one tensor), ``gate``, ``up``, ``down`` and their ``*_bias``; ``dense``: the weight or bias
# of a fused gate-up Linear; ``parallel``: a stacked parallel-experts weight.
FusedTensorRole = Literal[
    "gate_up", "gate", "up", "down", "gate_up_bias", "gate_bias", "up_bias", "down_bias", "dense", "parallel"
]


@dataclass(frozen=True)
class FusedTensor:
    """One fused tensor a layout reads, and the per-expert tensors it splits into.

    ``name`` is the tensor's (possibly dotted) name on the fused module (``gate_up_proj``,
    ``mlp.w1``, ``down_proj_bias``, ``gate_up_proj.weight`` of a dense MLP).  ``projections``
    are the defused projections it holds, in the order a split yields them: two for a gate-up
    tensor (its halves), one otherwise.  ``transposed`` says a weight is stored input-major
    (``[in, out]`` per expert) rather than in ``nn.Linear`` orientation; ``per_expert`` is
    False for a dense MLP, whose projections have no expert index.

    Every place that names fused tensors or the per-expert keys they become (defusion, the
    load-time split, the pre-load converters, the offline split and join, fusing back) reads
    them from here, so a new layout flag changes one method.
    """

    name: str
    role: FusedTensorRole
    projections: tuple[str, ...]
    is_bias: bool = False
    transposed: bool = False
    per_expert: bool = True

    @property
    def leaf(self) -> str:
        """``bias`` or ``weight``: the parameter name of each per-expert projection it fills."""
        return "bias" if self.is_bias else "weight"

    @property
    def is_gate_up(self) -> bool:
        """True when it holds two projections (gate and up halves) that a split separates."""
        return len(self.projections) == 2

    def keys(self, path: str, expert: int | None = None) -> tuple[str, ...]:
        """State-dict keys of the per-expert tensors it holds for the module at ``path`` (expert
        ``expert``, none for a dense MLP), in :attr:`projections` order."""
        owner = ".".join(part for part in (path, None if expert is None else str(expert)) if part)
        prefix = f"{owner}." if owner else ""
        return tuple(f"{prefix}{projection}.{self.leaf}" for projection in self.projections)

    @property
    def load_target(self) -> str:
        """The defused key (relative to the module) a checkpoint's fused tensor is loaded
        through: expert 0's first projection (``0.gate_proj.weight``)."""
        return self.keys("", 0 if self.per_expert else None)[0]


@dataclass(frozen=True)
class ExpertsLayout:
    """Where each projection of each expert lives inside fused 3D tensors.

    Non-transposed storage keeps ``gate_up_proj[e]`` as ``[2I, H]`` and ``down_proj[e]`` as
    ``[H, I]`` (``nn.Linear`` orientation); transposed storage keeps their transposes.
    Concatenated gate-up puts the gate in rows ``[:I]``; interleaved alternates gate and up.
    ``gate_first=False`` says the first half (or the even rows) is the up projection.

    Undecorated classes declare the rest: ``separate_gate_up`` (gate and up in two tensors),
    ``flattened`` (2D ``[E*I, H]`` storage), ``down_transposed`` (down oriented unlike the
    gate-up tensor), ``identity_experts`` (routing indices past the last expert pass the
    input through) and ``contract``, the forward the fused class exposes:
    ``"routed"`` ``(hidden_states, top_k_index, top_k_weights)``; ``"expert_major"``
    ``(hidden_states[E*T, H])``, every token through every expert (llama4);
    ``"weighted_all"`` ``(hidden_states, gammas)``, every token through every expert scaled
    per token before the down projection, summed in float32 (inkling's shared experts).
    ``post_expert_norm_by_expert`` says the post-expert norm holds one scale per expert and is
    called as ``post_expert_norm(expert_output, expert_ids)`` (ergo), not on its own.
    """

    num_experts: int
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    gate_first: bool = True
    has_post_expert_norm: bool = False
    post_expert_norm_by_expert: bool = False
    gate_up_name: str = "gate_up_proj"
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    separate_gate_up: bool = False
    flattened: bool = False
    down_transposed: bool | None = None
    identity_experts: int = 0
    contract: Literal["routed", "expert_major", "weighted_all"] = "routed"
    activation: str = "act_fn"  # attribute path of the activation on the fused module
    # "default": act(gate) * up; "module": the fused class's own ``_apply_gate``.
    gate_style: Literal["default", "module"] = "default"

    def __post_init__(self) -> None:
        problem = _layout_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def zero_copy(self) -> bool:
        """True when every per-expert weight can be a view of the fused storage."""
        gate_up_views = self.separate_gate_up or self.is_concatenated or not self.has_gate
        return not self.is_transposed and not self.transposed_down and gate_up_views

    @property
    def first_name(self) -> str:
        """Name of the tensor holding the gate (gate-up, or up when not gated)."""
        if self.separate_gate_up:
            return self.gate_name
        return self.gate_up_name if self.has_gate else self.up_name

    @property
    def transposed_down(self) -> bool:
        """True when ``down_proj[e]`` is stored as ``[I, H]`` (input-major)."""
        return self.is_transposed if self.down_transposed is None else self.down_transposed

    def with_overrides(self, **changes: Any) -> ExpertsLayout:
        """A copy with some fields replaced (plugins use this to declare quirks)."""
        return replace(self, **changes)

    def tensors(self) -> tuple[FusedTensor, ...]:
        """The fused tensors this layout reads: gate-up (or gate and up, or up alone), down,
        then the biases when ``has_bias``.  Separate gate and up tensors have one bias, the
        gate's (``{gate_name}_bias``)."""
        if self.separate_gate_up:
            inputs = [
                FusedTensor(self.gate_name, "gate", ("gate_proj",), transposed=self.is_transposed),
                FusedTensor(self.up_name, "up", ("up_proj",), transposed=self.is_transposed),
            ]
            first_bias: tuple[FusedTensorRole, tuple[str, ...]] = ("gate_bias", ("gate_proj",))
        elif self.has_gate:
            gate_up = ("gate_proj", "up_proj")
            inputs = [FusedTensor(self.gate_up_name, "gate_up", gate_up, transposed=self.is_transposed)]
            first_bias = ("gate_up_bias", ("gate_proj", "up_proj"))
        else:
            inputs = [FusedTensor(self.up_name, "up", ("up_proj",), transposed=self.is_transposed)]
            first_bias = ("up_bias", ("up_proj",))
        found = [*inputs, FusedTensor(self.down_name, "down", ("down_proj",), transposed=self.transposed_down)]
        if self.has_bias:
            role, projections = first_bias
            found.append(FusedTensor(f"{self.first_name}_bias", role, projections, is_bias=True))
            found.append(FusedTensor(f"{self.down_name}_bias", "down_bias", ("down_proj",), is_bias=True))
        return tuple(found)

    def tensor(self, name: str) -> FusedTensor | None:
        """The fused tensor ``name`` of :meth:`tensors`, or None when this layout reads none so named."""
        return next((tensor for tensor in self.tensors() if tensor.name == name), None)


_CONTRACTS = ("routed", "expert_major", "weighted_all")
_GATE_STYLES = ("default", "module")


def _layout_problem(layout: ExpertsLayout) -> str:
    """Why ``layout``'s fields cannot describe any experts module ("" when they can)."""
    if layout.contract not in _CONTRACTS:
        return f"contract must be one of {_CONTRACTS}, got {layout.contract!r}"
    if layout.gate_style not in _GATE_STYLES:
        return f"gate_style must be one of {_GATE_STYLES}, got {layout.gate_style!r}"
    if not isinstance(layout.identity_experts, int) or layout.identity_experts < 0:
        return f"identity_experts must be a count of 0 or more, got {layout.identity_experts!r}"
    if layout.post_expert_norm_by_expert and not layout.has_post_expert_norm:
        return "post_expert_norm_by_expert=True needs has_post_expert_norm=True"
    if layout.separate_gate_up:
        if not layout.has_gate:
            return "separate_gate_up=True needs has_gate=True (the gate is one of the two tensors)"
        if layout.has_bias:
            # Nothing reads or writes biases of separate gate and up tensors: refused, not dropped.
            return "separate_gate_up=True with has_bias=True is not supported (separate gate and up biases)"
        if not layout.is_concatenated or not layout.gate_first:
            return "is_concatenated and gate_first describe one gate_up tensor: leave them True with separate_gate_up"
    names = [layout.first_name, layout.down_name, *([layout.up_name] if layout.separate_gate_up else [])]
    if len(set(names)) != len(names):
        return f"the fused tensors need distinct names, got {', '.join(map(repr, names))}"
    return ""


@dataclass(frozen=True)
class ParallelLayout:
    """One stacked ``weight[E, out, in]`` applied per expert to token groups of given sizes
    (``forward(inputs, group_sizes)``: granite 5.3, jetmoe, aria 5.3).

    ``transposed`` stores ``[E, in, out]``.  ``gated_paths`` (paths of GLU input projections)
    and ``gate_first`` only document the layout: each expert's one ``linear`` keeps the gate
    and up rows together as the stacked weight did, and the parent splits its output.
    """

    weight_name: str = "weight"
    transposed: bool = False
    gated_paths: str = ""
    gate_first: bool = True

    @property
    def is_concatenated(self) -> bool:
        """Gate and up halves are always concatenated in a parallel projection."""
        return True

    def tensors(self) -> tuple[FusedTensor, ...]:
        """The stacked weight, split into one ``linear`` per expert."""
        return (FusedTensor(self.weight_name, "parallel", ("linear",), transposed=self.transposed),)


@dataclass(frozen=True)
class DenseLayout:
    """A dense MLP whose gate and up projections live in one ``nn.Linear``."""

    fused_name: str = "gate_up_proj"
    gate_first: bool = True

    def tensors(self) -> tuple[FusedTensor, ...]:
        """The fused Linear's weight and bias (a Linear without bias holds only the first)."""
        halves = ("gate_proj", "up_proj")
        return (
            FusedTensor(f"{self.fused_name}.weight", "dense", halves, per_expert=False),
            FusedTensor(f"{self.fused_name}.bias", "dense", halves, is_bias=True, per_expert=False),
        )


@dataclass
class Candidate:
    """One fused block found in a model, and who will defuse it."""

    path: str
    module: nn.Module
    kind: Literal["experts", "dense", "parallel"]
    plugin: str
    layout: ExpertsLayout | DenseLayout | ParallelLayout
    model_type: str | None = None
    generic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Why this fused module must not be defused (an unknown structure); empty when it can be.
    # ``convert_model`` raises ``ConversionError`` naming every refused module it would
    # convert, before it changes anything.
    refusal: str = ""

    @property
    def class_name(self) -> str:
        """Class name of the fused module."""
        return type(self.module).__name__


def _uses_default_gate(module: nn.Module) -> bool:
    apply_gate = getattr(type(module), "_apply_gate", None)
    # transformers installs its default gate only on classes that define none.
    return apply_gate is None or getattr(apply_gate, "__name__", "") == "_default_apply_gate"


def read_experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """Read the layout that ``@use_experts_implementation`` recorded on ``module``.

    Returns None for modules the decorator did not wrap or whose tensors do not match the
    recorded flags (for example an experts module that was already replaced by a quantizer).
    """
    if not all(isinstance(getattr(module, flag, None), bool) for flag in _DECORATOR_FLAGS):
        return None
    has_gate = module.has_gate
    # Registered tensors only: a defused module answers fused names with placeholders.
    fused_in = resolve_tensor(module, "gate_up_proj" if has_gate else "up_proj")
    down = resolve_tensor(module, "down_proj")
    if getattr(fused_in, "ndim", 0) != 3 or getattr(down, "ndim", 0) != 3:
        return None
    if fused_in.shape[0] != down.shape[0]:
        return None
    return ExpertsLayout(
        num_experts=int(fused_in.shape[0]),
        has_gate=has_gate,
        has_bias=module.has_bias,
        is_transposed=module.is_transposed,
        is_concatenated=bool(getattr(module, "is_concatenated", True)),
        has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)),
        gate_style="default" if _uses_default_gate(module) else "module",
    )


def resolve_tensor(module: nn.Module, name: str) -> Any:
    """The registered tensor ``name`` of ``module`` (dotted names reach into children), or None."""
    *owners, leaf = name.split(".")
    for owner in owners:
        module = module._modules.get(owner)
        if module is None:
            return None
    return {**module._buffers, **module._parameters}.get(leaf)


def declared_experts_layout(module: nn.Module, **fields: Any) -> ExpertsLayout | None:
    """Layout of an undecorated experts ``module`` from a plugin's declaration ``fields``.

    A callable field value is called with the module (per-instance values such as a count
    of identity experts).  The expert count is read from the tensors (or the module's
    ``num_experts`` for flattened storage).  Returns None when the declared tensors are
    missing, e.g. already defused.
    """
    values = {name: value(module) if callable(value) else value for name, value in fields.items()}
    layout = ExpertsLayout(num_experts=0, **values)
    fused_in, down = resolve_tensor(module, layout.first_name), resolve_tensor(module, layout.down_name)
    rank = 2 if layout.flattened else 3
    if getattr(fused_in, "ndim", 0) != rank or getattr(down, "ndim", 0) != rank:
        return None
    count = getattr(module, "num_experts", None) if layout.flattened else down.shape[0]
    if not isinstance(count, int) or count < 1:
        return None
    return replace(layout, num_experts=count)
