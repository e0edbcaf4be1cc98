"""The kinds of fused block defuser handles, one object each, in one table.

A :class:`~defuser.engine.candidates.Candidate` names its kind (``experts``, ``dense`` or
``parallel``); everything that differs between kinds once a block is found is a method of the
kind's object in :data:`KINDS`: defusing it with the generic engine, recognising its defused
form, fusing that back, naming what a replaced module still holds, and describing it.  Adding a
kind means adding one class here.

The modules doing the work are imported when a method runs: this table is imported by modules
those import in turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, cast

from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout

if TYPE_CHECKING:
    import torch

__all__ = ["KINDS", "BlockKind", "KindName", "defused_kind"]

KindName = Literal["experts", "dense", "parallel"]
Layout = ExpertsLayout | DenseLayout | ParallelLayout


class BlockKind:
    """What differs between kinds of fused block once one is found (see the module docstring)."""

    name: KindName
    # True when the defused form replaces the fused module (and holds the experts, with nothing
    # defused inside); False when the fused module is split in place (a dense MLP).
    replaces_module: bool = True

    def defuse(self, candidate: Candidate) -> nn.Module:
        """The generic engine's defused form of ``candidate`` (what takes its place)."""
        raise NotImplementedError

    def defused_layout(self, module: nn.Module) -> Layout | None:
        """The layout ``module`` was defused with, when it is a defused block of this kind."""
        raise NotImplementedError

    def fuse(self, module: nn.Module, path: str) -> nn.Module:
        """The fused module standing in for the defused ``module`` at ``path``."""
        raise NotImplementedError

    def replaced_tensor_names(self, candidate: Candidate) -> tuple[str, ...]:
        """The (dotted) fused tensor names the replaced module of ``candidate`` still holds."""
        return tuple(tensor.name for tensor in candidate.layout.tensors())

    def defused_keys(self, module: nn.Module, prefix: str) -> Iterator[str]:
        """State-dict keys standing for the defused ``module`` (at ``prefix``): those of its
        first expert, whose patterns match every expert."""
        first = module._modules.get("0")
        if first is not None:
            for name, _ in first.named_parameters():
                yield f"{prefix}0.{name}"

    def fused_tensors(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        """The fused tensors of ``candidate``'s module, by name relative to it."""
        return dict(candidate.module.named_parameters())

    def describe(self, candidate: Candidate, tensors: dict[str, torch.Tensor]) -> str:
        """What ``candidate`` (with its fused ``tensors``) is defused into, in a few words."""
        raise NotImplementedError


class ExpertsKind(BlockKind):
    """Fused MoE experts: 3D (or flattened) tensors become numbered experts of three Linears."""

    name: KindName = "experts"

    def defuse(self, candidate: Candidate) -> nn.Module:
        from defuser.engine.experts import DefusedExperts

        return DefusedExperts.from_fused(candidate.module, cast(ExpertsLayout, candidate.layout))

    def defused_layout(self, module: nn.Module) -> Layout | None:
        from defuser.engine.experts import DefusedExperts

        return module.layout if isinstance(module, DefusedExperts) else None

    def fuse(self, module: nn.Module, path: str) -> nn.Module:
        from defuser.engine.fuse import fuse_experts

        return fuse_experts(module, path)

    def describe(self, candidate: Candidate, tensors: dict[str, torch.Tensor]) -> str:
        layout = cast(ExpertsLayout, candidate.layout)
        names = "gate_proj, up_proj, down_proj" if layout.has_gate else "up_proj, down_proj"
        extra = f" + {layout.identity_experts} identity experts" if layout.identity_experts else ""
        return f"{layout.num_experts} experts x ({names}) nn.Linear{extra}"


class ParallelKind(BlockKind):
    """Parallel experts: one stacked weight becomes one Linear per expert."""

    name: KindName = "parallel"

    def defuse(self, candidate: Candidate) -> nn.Module:
        from defuser.engine.parallel import DefusedParallelExperts

        return DefusedParallelExperts(candidate.module, cast(ParallelLayout, candidate.layout), candidate.path)

    def defused_layout(self, module: nn.Module) -> Layout | None:
        from defuser.engine.parallel import DefusedParallelExperts

        return module.layout if isinstance(module, DefusedParallelExperts) else None

    def fuse(self, module: nn.Module, path: str) -> nn.Module:
        from defuser.engine.fuse import fuse_parallel

        return fuse_parallel(module, cast(ParallelLayout, module.layout), path)

    def describe(self, candidate: Candidate, tensors: dict[str, torch.Tensor]) -> str:
        weight = next(iter(tensors.values()))
        return f"{weight.shape[0]} nn.Linear (one per expert)"


class DenseKind(BlockKind):
    """A dense MLP whose fused gate-up Linear is split into ``gate_proj`` and ``up_proj`` in place."""

    name: KindName = "dense"
    replaces_module = False

    def defuse(self, candidate: Candidate) -> nn.Module:
        from defuser.engine.dense import split_dense_mlp

        return split_dense_mlp(candidate.module, cast(DenseLayout, candidate.layout))

    def defused_layout(self, module: nn.Module) -> Layout | None:
        from defuser.engine.dense import split_dense_layout

        return split_dense_layout(module)

    def fuse(self, module: nn.Module, path: str) -> nn.Module:
        from defuser.engine.dense import join_dense_mlp
        from defuser.engine.fuse import fuse_dense_mlp

        return join_dense_mlp(module, fuse_dense_mlp(module, path))

    def replaced_tensor_names(self, candidate: Candidate) -> tuple[str, ...]:
        return ()  # split in place: no replaced module keeps the fused Linear

    def defused_keys(self, module: nn.Module, prefix: str) -> Iterator[str]:
        for half in ("gate_proj", "up_proj"):
            linear = module._modules[half]
            if linear is not None:
                for name, _ in linear.named_parameters():
                    yield f"{prefix}{half}.{name}"

    def fused_tensors(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        fused_name = cast(DenseLayout, candidate.layout).fused_name
        fused = getattr(candidate.module, fused_name)
        return {f"{fused_name}.{name}": tensor for name, tensor in fused.named_parameters()}

    def describe(self, candidate: Candidate, tensors: dict[str, torch.Tensor]) -> str:
        fused = getattr(candidate.module, cast(DenseLayout, candidate.layout).fused_name)
        return f"gate_proj + up_proj, {fused.out_features // 2}x{fused.in_features} each"


# Every kind, in the order a defused module is recognised.
KINDS: dict[str, BlockKind] = {kind.name: kind for kind in (ExpertsKind(), ParallelKind(), DenseKind())}


def defused_kind(module: nn.Module) -> BlockKind | None:
    """The kind of defused block ``module`` is, or None when it is none."""
    return next((kind for kind in KINDS.values() if kind.defused_layout(module) is not None), None)
