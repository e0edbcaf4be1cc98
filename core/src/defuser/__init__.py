"""defuser: turn fused MoE experts and fused MLPs of transformers models into per-expert
``nn.Linear`` modules, with the forward math unchanged.

Public API::

    from defuser import convert_model, fuse_model, replace_fused_blocks, restore_fused_blocks, defused_blocks

Plugin authors also use :data:`hookimpl`, :class:`PluginInfo`, :class:`TypeSupport` and
:class:`defuser.family.Family`.  Attributes load on first access, so ``import defuser`` stays
cheap and imports no plugin.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DistributedPlanError",
    "PluginInfo",
    "TypeSupport",
    "__version__",
    "convert_model",
    "defused_blocks",
    "fuse_model",
    "hookimpl",
    "replace_fused_blocks",
    "restore_fused_blocks",
]

_LAZY = {
    "DistributedPlanError": "defuser.api",
    "convert_model": "defuser.api",
    "fuse_model": "defuser.api",
    "replace_fused_blocks": "defuser.api",
    "restore_fused_blocks": "defuser.api",
    "defused_blocks": "defuser.api",
    "hookimpl": "defuser.hookspecs",
    "PluginInfo": "defuser.plugin_info",
    "TypeSupport": "defuser.plugin_info",
}

if TYPE_CHECKING:
    from defuser.api import (
        DistributedPlanError,
        convert_model,
        defused_blocks,
        fuse_model,
        replace_fused_blocks,
        restore_fused_blocks,
    )
    from defuser.hookspecs import hookimpl
    from defuser.plugin_info import PluginInfo, TypeSupport


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'defuser' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
