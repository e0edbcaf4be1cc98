"""Checkpoint-loading pieces plugged into transformers' weight conversion machinery.

transformers renames each checkpoint key to a key of the model before converting it, so a
fused tensor is routed to expert 0's key and :class:`SplitFusedExperts` then emits the keys
of every expert.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

__all__ = ["SplitFusedExperts", "expert_projection_renames", "split_on_load_converter"]

_EXPERT_ZERO = re.compile(r"(^|\.)0\.")
# A source pattern no key can match: the reverse of a load-only split (see below).
_NEVER = r"(?!)defuser-never"


def _expert_key(pattern: str, index: int) -> str:
    return _EXPERT_ZERO.sub(lambda match: f"{match.group(1)}{index}.", pattern, count=1)


class SplitFusedExperts(ConversionOps):
    """Split a fused ``[E, 2I, H]`` gate-up (``gated``) or ``[E, H, I]`` tensor into one
    tensor per expert and projection, named by the target patterns with expert 0 replaced."""

    def __init__(self, gated: bool):
        self.gated = gated

    def __repr__(self) -> str:
        return f"SplitFusedExperts(gated={self.gated})"

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        result = {}
        for index in range(tensor.shape[0]):
            if self.gated:
                gate, up = tensor[index].chunk(2, dim=0)
                result[_expert_key(target_patterns[0], index)] = gate
                result[_expert_key(target_patterns[1], index)] = up
            else:
                result[_expert_key(target_patterns[0], index)] = tensor[index]
        return result

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("SplitFusedExperts is applied on load only")


class _LoadOnlyConverter(WeightConverter):
    """A converter whose reverse (used by ``save_pretrained``) leaves keys alone: the defused
    per-expert keys already are the stock checkpoint format."""

    def reverse_transform(self) -> WeightRenaming:
        return WeightRenaming(source_patterns=_NEVER, target_patterns="unused")


def split_on_load_converter(
    source: str, targets: list[str], operation: ConversionOps, keep_reverse: bool = False
) -> WeightConverter:
    """A converter that splits ``source`` into ``targets`` on load (reversed on save only
    when ``keep_reverse``)."""
    cls = WeightConverter if keep_reverse else _LoadOnlyConverter
    return cls(source_patterns=source, target_patterns=targets, operations=[operation])


class _ProjectionRenaming(WeightRenaming):
    """Renames one projection of every expert; its reverse restores the legacy name."""

    def reverse_transform(self) -> WeightRenaming:
        legacy, current = self._defuser_names
        return WeightRenaming(rf"\.experts\.(\d+)\.{current}\.", rf".experts.\1.{legacy}.")


def expert_projection_renames(names: dict[str, str]) -> list[WeightRenaming]:
    """Renamings from legacy per-expert projection names (``w1``) to defused ones
    (``gate_proj``), reversed on save so checkpoints keep the legacy names stock loads."""
    renames = []
    for legacy, current in names.items():
        rename = _ProjectionRenaming(rf"\.experts\.(\d+)\.{legacy}\.", rf".experts.\1.{current}.")
        object.__setattr__(rename, "_defuser_names", (legacy, current))
        renames.append(rename)
    return renames
