"""Fusing one defused module of a model back, all or nothing: tensors, offload store, hooks.

:mod:`defuser.engine.fuse` builds the fused module from the per-expert weights.  This module
puts it in the model the way conversion put the defused one there, in reverse:

- under accelerate dispatch (:func:`defuser.engine.offload.dispatched_conversion`), the
  per-expert weights are loaded from the offload store, the fused tensors are written to it
  under their own names (replacing the entries a conversion without ``cleanup_original``
  left behind, which hold the weights as they were before any edit) and put back on
  ``meta`` behind an offload hook of their own, and the per-expert entries leave the store;
  modules kept on a device get the execution-device hook;
- the hooks registered on the defused module follow the fused one
  (:mod:`defuser.engine.hooks`).

A module that cannot be fused back raises :class:`~defuser.engine.fuse.NotFusable` and is left
as it is; any other failure (a full disk while writing the store) puts the module and the
store back as they were and raises :class:`FusionError` naming the module.
"""

from __future__ import annotations

from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout
from defuser.engine.detect import Parents, parents_of
from defuser.engine.fuse import NotFusable
from defuser.engine.hooks import FUSION_ADVICE, HookError, module_hooks
from defuser.engine.kinds import KINDS, KindName
from defuser.engine.offload import dispatched_conversion
from defuser.engine.transaction import snapshot_module

__all__ = ["FusionError", "fuse_back"]

Kind = KindName


class FusionError(RuntimeError):
    """Fusing one module back failed; that module (and any offload store) was left as it was."""


def _layout(module: nn.Module, kind: Kind) -> ExpertsLayout | DenseLayout | ParallelLayout:
    layout = KINDS[kind].defused_layout(module)
    if layout is None:
        raise NotFusable(f"{type(module).__name__} keeps no record of its fused {kind} form")
    return layout


def fuse_back(model: nn.Module, path: str, module: nn.Module, kind: Kind, parents: Parents | None = None) -> nn.Module:
    """Fuse the defused ``module`` at ``path`` of ``model`` back in place; returns the module
    now standing there (``parents``, recorded by the walk that found it, saves walking the
    model again to put it there).  Raises :class:`~defuser.engine.fuse.NotFusable` (module left as it
    is) or :class:`FusionError` (module and offload store put back as they were)."""
    candidate = Candidate(path, module, kind, plugin="fuse_model", layout=_layout(module, kind))
    saved, cls = snapshot_module(module), type(module)
    hooks = module_hooks(module, path)
    try:
        with dispatched_conversion(model, candidate, cleanup_original=True, replace_entries=True) as placement:
            # A dense MLP is joined in place: the replacement is ``module`` itself.
            replacement = KINDS[kind].fuse(module, path)
            hooks.follow(replacement, FUSION_ADVICE)
            placement.place(replacement)
    except BaseException as error:
        saved.restore()
        module.__class__ = cls  # a dense MLP built patched gets its stock class back when joined
        if isinstance(error, HookError):
            raise NotFusable(str(error)) from error
        if isinstance(error, NotFusable) or not isinstance(error, Exception):
            raise
        raise FusionError(f"fusing {path} ({type(module).__name__}) back failed: {error}") from error
    if replacement is not module:
        for parent, name in parents_of(model, module, parents):
            parent._modules[name] = replacement
    return replacement
