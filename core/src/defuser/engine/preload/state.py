"""Everything pre-load patching changed, held by one object.

Several model types may patch the same class, tie or checkpoint mapping; each stays patched
while any patched model type needs it.  :data:`PATCHES` records what each patched model type
needs and what was there before, which is what the installers (:mod:`.classes`, :mod:`.ties`,
:mod:`.mappings`) read to make transformers' state agree with it, and to put back the stock
state when nothing needs a patch any more.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from defuser.engine.candidates import ParallelLayout
from defuser.engine.parallel_preload import ParallelPatch
from defuser.engine.preload.plan import PreloadPlan

__all__ = ["PATCHES", "ActivePatch", "PatchState"]


@dataclass
class ActivePatch:
    """What the patch of one model type holds: its plan, the classes it replaces, the fused
    tensor names its checkpoint mapping splits, and the ties and parallel classes it changes."""

    plan: PreloadPlan
    # (module name, class name) -> the class it replaces, and its replacement
    classes: dict[tuple[str, str], tuple[type, type]]
    fused_tensors: dict[str, str]  # fused experts tensor name -> the defused key it loads through
    dense_names: frozenset[str]
    # Patched class names that a model class of these modules records outputs of: transformers'
    # patch registry must know them (see recorded_class_names).
    recorded: frozenset[str] = frozenset()
    # model class -> its ``_tied_weights_keys`` without ties between fused experts tensors
    tied: dict[type, dict[str, str]] = field(default_factory=dict)
    parallel: ParallelPatch | None = None


class PatchState:
    """What pre-load patching holds: the patch of each model type and the stock state it replaced.

    Only :mod:`defuser.engine.preload` changes it, under :attr:`lock`.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # model type -> what its patch holds, in the order the types were patched
        self.active: dict[str, ActivePatch] = {}
        # checkpoint mapping key -> the stock mapping before the first patch touching it
        self.stock_mappings: dict[str, Any] = {}
        # (module name, class name) -> its replacement class while patched: every model type
        # patching a class installs the same class object
        self.replacements: dict[tuple[str, str], type] = {}
        # patched class -> the (module, attribute) places it was rebound in
        self.bound: dict[tuple[str, str], list[tuple[str, str]]] = {}
        # model class -> its own ``_tied_weights_keys`` before a patch changed them
        self.tied_originals: dict[type, Any] = {}

    def model_types(self) -> list[str]:
        """The model types patched now, in the order they were patched."""
        return list(self.active)

    def parallel_layouts(self) -> dict[type, ParallelLayout]:
        """Every parallel-experts class patched now, with its layout."""
        patches = [active.parallel for active in list(self.active.values()) if active.parallel]
        return {cls: layout for patch in patches for cls, layout in patch.layouts.items()}


# The one patch state of the process.
PATCHES = PatchState()
