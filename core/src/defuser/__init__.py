"""defuser: turn fused MoE experts and fused MLPs of transformers models into per-expert
``nn.Linear`` modules, with the forward math unchanged.

Public API::

    from defuser import convert_model, fuse_model, replace_fused_blocks, restore_fused_blocks, defused_blocks

    from defuser import find_candidates  # the fused blocks a model still holds
    from defuser import ConversionError  # what a refused or failed conversion raises

Plugin authors import everything they need from :mod:`defuser.plugin` (``Family``,
``TypeSupport``, the layouts, ``hookimpl``, ``PreloadPlan``...).  Stable: ``defuser`` and
``defuser.plugin``; every other module (``defuser.engine.*``, ``defuser.api``,
``defuser.family``, ``defuser.plugins``, ...) is internal and may change in any release.
Attributes load on first access, so ``import defuser`` stays cheap and imports no plugin.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "DistributedPlanError",
    "PluginInfo",
    "TypeSupport",
    "__version__",
    "convert_model",
    "defused_blocks",
    "find_candidates",
    "fuse_model",
    "hookimpl",
    "replace_fused_blocks",
    "restore_fused_blocks",
]

_LAZY = {
    "ConversionError": "defuser.errors",
    "DistributedPlanError": "defuser.api",
    "find_candidates": "defuser.api",
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
        find_candidates,
        fuse_model,
        replace_fused_blocks,
        restore_fused_blocks,
    )
    from defuser.errors import ConversionError
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
