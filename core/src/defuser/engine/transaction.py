"""Undo for a failed defusion: a cheap snapshot of a module tree's structure.

A plugin's defuse hook may change the fused module before it fails (move a tensor, drop a
child, set an attribute).  The snapshot keeps, for every module of the tree, its attribute
dict and copies of its parameter, buffer and child dicts, plus each tensor's data object:
restoring puts all of them back, so the module has the same tensors and the same forward as
before.  No weight bytes are copied; writes *into* a tensor's storage are not undone.

With :func:`releasing_consumed` active (``convert_model(..., cleanup_original=True)``), the
engine may release a fused weight as soon as it has been copied (:func:`consumed_releaser`),
so a copy layout needs memory for one fused tensor's copy at a time, not for the whole
module's.  The snapshot then forgets that tensor and keeps how to rebuild it from the copies:
a failure later still puts back a tensor equal to it (a new Parameter object).  Or the engine
rewrites a fused weight's bytes in place (:mod:`defuser.engine.inplace`) and registers how to
undo that (:meth:`ModuleSnapshot.on_restore`): a failure then puts the same Parameter back
with its original bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleSnapshot", "consumed_releaser", "releasing_consumed", "releasing_snapshot", "snapshot_module"]

_DICTS = ("_parameters", "_buffers", "_modules")


@dataclass
class ModuleSnapshot:
    """What :func:`snapshot_module` recorded; :meth:`restore` puts it back."""

    states: list[tuple[nn.Module, dict[str, Any]]]
    tensor_data: list[tuple[torch.Tensor, torch.Tensor]]
    # Ids of parameters held elsewhere too (ties, shared storage): never released or rewritten.
    shared: frozenset[int] = field(default_factory=frozenset)
    # Undo actions of in-place rewrites, run last first by :meth:`restore`.
    undo: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        """Undo in-place rewrites, then put every recorded module attribute, child and tensor back."""
        while self.undo:
            self.undo.pop()()
        for module, state in self.states:
            module.__dict__.clear()
            module.__dict__.update({name: dict(value) if name in _DICTS else value for name, value in state.items()})
            parameters = module._parameters
            for name, value in parameters.items():
                if isinstance(value, _Released):
                    parameters[name] = nn.Parameter(value.rebuild(), requires_grad=value.requires_grad)
        for tensor, data in self.tensor_data:
            if tensor.data is not data:
                with torch.no_grad():
                    tensor.data = data

    def owned(self, module: nn.Module, name: str) -> nn.Parameter | None:
        """``module``'s parameter ``name`` when only that place holds it: a plain Parameter that
        this snapshot recorded there, tied nowhere else; otherwise None."""
        parameter = module._parameters.get(name)
        if type(parameter) is not nn.Parameter or id(parameter) in self.shared:
            return None
        state = next((state for owner, state in self.states if owner is module), None)
        if state is None or state["_parameters"].get(name) is not parameter:
            return None
        elsewhere = (
            held for owner, kept in self.states if owner is not module for held in kept["_parameters"].values()
        )
        return None if any(held is parameter for held in elsewhere) else parameter

    def data_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The data tensor this snapshot recorded for ``tensor`` (None: not recorded)."""
        return next((data for held, data in self.tensor_data if held is tensor), None)

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Have :meth:`restore` call ``undo`` (before anything else; the last registered first)."""
        self.undo.append(undo)

    def release(self, module: nn.Module, name: str, rebuild: Callable[[], torch.Tensor]) -> bool:
        """Drop ``module``'s parameter ``name`` and every reference this snapshot holds to it,
        keeping ``rebuild`` to make an equal one on :meth:`restore`; False (nothing done) for a
        parameter that is tied elsewhere, of a Parameter subclass, or not in the snapshot."""
        parameter = self.owned(module, name)
        if parameter is None:
            return False
        state = next(state for owner, state in self.states if owner is module)
        state["_parameters"][name] = _Released(rebuild, parameter.requires_grad)
        self.tensor_data = [(tensor, data) for tensor, data in self.tensor_data if tensor is not parameter]
        module._parameters[name] = None
        return True


@dataclass(frozen=True)
class _Released:
    """A parameter released mid-conversion, as the snapshot keeps it."""

    rebuild: Callable[[], torch.Tensor]
    requires_grad: bool


_active_release: ContextVar[ModuleSnapshot | None] = ContextVar("defuser_release", default=None)


@contextmanager
def releasing_consumed(snapshot: ModuleSnapshot) -> Iterator[None]:
    """While active, :func:`consumed_releaser` lets the engine release the fused tensors it has
    copied from modules of ``snapshot``'s tree."""
    token = _active_release.set(snapshot)
    try:
        yield
    finally:
        _active_release.reset(token)


def releasing_snapshot(module: nn.Module) -> ModuleSnapshot | None:
    """The snapshot of :func:`releasing_consumed` when it covers ``module``, else None (the
    default: the fused module stays intact)."""
    snapshot = _active_release.get()
    if snapshot is None or not any(module is owner for owner, _ in snapshot.states):
        return None
    return snapshot


def consumed_releaser(module: nn.Module) -> Callable[[str, Callable[[], torch.Tensor]], bool] | None:
    """A function releasing ``module``'s parameter ``name`` (given how to rebuild it), or None
    when releasing is not active for it (the default: the fused module stays intact)."""
    snapshot = releasing_snapshot(module)
    if snapshot is None:
        return None
    return lambda name, rebuild: snapshot.release(module, name, rebuild)


def snapshot_module(root: nn.Module, shared: frozenset[int] = frozenset()) -> ModuleSnapshot:
    """Record ``root``'s tree (structure and tensor objects, not their bytes); ``shared`` holds
    ids of parameters that something outside the tree holds too."""
    states = []
    tensor_data = []
    seen: set[int] = set()
    for module in root.modules():
        state = {name: dict(value) if name in _DICTS else value for name, value in module.__dict__.items()}
        states.append((module, state))
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                tensor_data.append((tensor, tensor.data))
    return ModuleSnapshot(states, tensor_data, shared)
