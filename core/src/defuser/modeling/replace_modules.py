"""``materialize_model``, under the module path of ModelCloud's Defuser (GPTQModel imports it).

Defuser defers part of its conversion: replacement modules keep the original fused module and
copy its weights on ``materialize_model``.  This project converts eagerly, so a converted model
has nothing left to copy; the function keeps the same contract for callers written against
Defuser: afterwards no conversion work is pending, every parameter or buffer still on the
meta device is named in a warning, and the original fused modules that ``convert_model``
replaced no longer hold their fused tensors (as ``cleanup_original=True`` would have done).
"""

from __future__ import annotations

import logging
import weakref

from torch import nn

__all__ = ["drop_fused_tensors", "materialize_model", "release_original_modules", "remember_original"]

logger = logging.getLogger(__name__)

# Fused modules that convert_model replaced without cleanup_original (while anything else,
# a caller's variable, an optimizer, a hook, still holds them) -> their fused tensor names.
_originals: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def remember_original(module: nn.Module, tensor_names: tuple[str, ...]) -> None:
    """Record a fused ``module`` that a conversion replaced and the (dotted) names of its fused
    tensors, for :func:`release_original_modules`."""
    _originals[module] = tuple(tensor_names)


def release_original_modules() -> int:
    """Drop the fused tensors of every replaced fused module still alive; returns how many
    modules let go of tensors.  Per-expert weights that are views keep their storage alive."""
    released = 0
    for module, names in list(_originals.items()):
        released += drop_fused_tensors(module, names)
        _originals.pop(module, None)
    return released


def drop_fused_tensors(module: nn.Module, tensor_names: tuple[str, ...]) -> bool:
    """Set the parameters ``tensor_names`` (dotted names reach into children) of a replaced
    fused ``module`` to None; True when one was dropped."""
    dropped = False
    for name in tensor_names:
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if isinstance(owner._parameters.get(leaf), nn.Parameter):
            owner._parameters[leaf] = None
            dropped = True
    return dropped


def materialize_model(model: nn.Module) -> None:
    """Finish the conversion of ``model`` the way Defuser's ``materialize_model`` does.

    Nothing is deferred here (conversion copies or views weights at once), so this only
    checks and cleans up: each parameter and buffer of ``model`` still on the meta device is
    named in a warning (a model that ``from_pretrained`` did not fill, or one dispatched
    with disk offload, where that is expected), and the fused modules that ``convert_model``
    replaced release their fused tensors.  ``model`` may be a whole model or one layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"materialize_model expects a torch.nn.Module, got {type(model).__name__}")
    on_meta = 0
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor is not None and tensor.device.type == "meta":
                logger.warning("%s %s is still on the meta device after materialization", kind, name)
                on_meta += 1
    released = release_original_modules()
    logger.debug("materialize_model: %d tensor(s) on meta, %d original module(s) released", on_meta, released)
