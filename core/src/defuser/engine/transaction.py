"""Undo for a failed defusion: a cheap snapshot of a module tree's structure.

A plugin's defuse hook may change the fused module before it fails (move a tensor, drop a
child, set an attribute).  The snapshot keeps, for every module of the tree, its attribute
dict and copies of its parameter, buffer and child dicts, plus each tensor's data object:
restoring puts all of them back, so the module has the same tensors and the same forward as
before.  No weight bytes are copied; writes *into* a tensor's storage are not undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModuleSnapshot", "snapshot_module"]

_DICTS = ("_parameters", "_buffers", "_modules")


@dataclass
class ModuleSnapshot:
    """What :func:`snapshot_module` recorded; :meth:`restore` puts it back."""

    states: list[tuple[nn.Module, dict[str, Any]]]
    tensor_data: list[tuple[torch.Tensor, torch.Tensor]]

    def restore(self) -> None:
        """Put every recorded module attribute, child and tensor back."""
        for module, state in self.states:
            module.__dict__.clear()
            module.__dict__.update({name: dict(value) if name in _DICTS else value for name, value in state.items()})
        for tensor, data in self.tensor_data:
            if tensor.data is not data:
                with torch.no_grad():
                    tensor.data = data


def snapshot_module(root: nn.Module) -> ModuleSnapshot:
    """Record ``root``'s tree (structure and tensor objects, not their bytes)."""
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
    return ModuleSnapshot(states, tensor_data)
