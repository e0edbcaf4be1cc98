"""Pre-load patching: build models with defused blocks and load any checkpoint layout into them.

A :class:`PreloadPlan` (from a plugin) changes two things, each in its own module:

* classes (:mod:`.classes`): the experts and declared dense MLP classes of the plan's modeling
  modules are replaced by defused ones wherever transformers holds them, so ``from_pretrained``,
  ``from_config`` and direct construction all build defused blocks; ties between fused experts
  tensors (:mod:`.ties`) are left out while patched;
* checkpoint mappings (:mod:`.mappings`): the stock conversions that fuse per-expert keys are
  dropped and fused checkpoint tensors are split per expert on load.

While any model type is patched, every ``from_pretrained`` is checked (:mod:`.loadcheck`): a
load leaving weights of defused blocks missing raises (the checkpoint held keys nothing took)
or warns (the checkpoint lacks them).

:mod:`.state` holds what is patched and what was there before; :mod:`.patching` applies and
undoes a plan; every private transformers internal this touches is behind :mod:`defuser._hf`.
Several model types may patch the same class or mapping; each stays patched while any patched
model type needs it, and goes back to the stock one when none does.
"""

from defuser.engine.preload.classes import decorated_experts_classes, fused_dense_classes
from defuser.engine.preload.patching import (
    apply_preload_plan,
    is_patched,
    patched_model_types,
    restore_preload_patches,
)
from defuser.engine.preload.plan import PreloadPlan

__all__ = [
    "PreloadPlan",
    "apply_preload_plan",
    "decorated_experts_classes",
    "fused_dense_classes",
    "is_patched",
    "patched_model_types",
    "restore_preload_patches",
]
