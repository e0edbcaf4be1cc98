"""Descriptions of fused blocks: what detection finds and what defusion consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Candidate", "DenseLayout", "ExpertsLayout", "read_experts_layout"]

# Attributes that ``@use_experts_implementation`` sets on every instance it wraps (5.3.0
# already; ``is_concatenated`` and ``has_post_expert_norm`` came later and default off).
_DECORATOR_FLAGS = ("has_gate", "has_bias", "is_transposed")


@dataclass(frozen=True)
class ExpertsLayout:
    """Where each projection of each expert lives inside fused 3D tensors.

    Non-transposed storage keeps ``gate_up_proj[e]`` as ``[2I, H]`` and ``down_proj[e]`` as
    ``[H, I]`` (``nn.Linear`` orientation); transposed storage keeps their transposes.
    Concatenated gate-up puts the gate in rows ``[:I]``; interleaved alternates gate and up.
    ``gate_first=False`` says the first half (or the even rows) is the up projection.
    """

    num_experts: int
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    gate_first: bool = True
    has_post_expert_norm: bool = False
    gate_up_name: str = "gate_up_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    # "default": act(gate) * up; "module": the fused class's own ``_apply_gate``.
    gate_style: Literal["default", "module"] = "default"

    @property
    def zero_copy(self) -> bool:
        """True when every per-expert weight can be a view of the fused storage."""
        return not self.is_transposed and (self.is_concatenated or not self.has_gate)

    def with_overrides(self, **changes: Any) -> ExpertsLayout:
        """A copy with some fields replaced (plugins use this to declare quirks)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class DenseLayout:
    """A dense MLP whose gate and up projections live in one ``nn.Linear``."""

    fused_name: str = "gate_up_proj"
    gate_first: bool = True


@dataclass
class Candidate:
    """One fused block found in a model, and who will defuse it."""

    path: str
    module: nn.Module
    kind: Literal["experts", "dense"]
    plugin: str
    layout: ExpertsLayout | DenseLayout
    model_type: str | None = None
    generic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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
    tensors = {**module._buffers, **module._parameters}
    fused_in = tensors.get("gate_up_proj" if has_gate else "up_proj")
    down = tensors.get("down_proj")
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
