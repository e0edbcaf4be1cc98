"""Saying so when a load while patched left weights of defused blocks missing.

transformers initialises missing weights at random and reports them only in its load report; a
defused block missing its weights gives wrong outputs.  While any model type is patched, every
``from_pretrained`` is checked once the weights are in (see :func:`defuser._hf.set_load_check`).
"""

from __future__ import annotations

import logging

from torch import nn

from defuser.errors import ConversionError

__all__ = ["check_defused_loaded"]

logger = logging.getLogger(__name__)

# Keys named in a message, at most.
_SHOWN = 8


def _shown(keys: set[str]) -> str:
    names = sorted(keys)
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_defused_loaded(model: nn.Module, missing: set[str], unexpected: set[str]) -> None:
    """Raise a ConversionError when ``model`` is left with weights of defused blocks ``missing``
    while the checkpoint held ``unexpected`` keys (a checkpoint tensor that found no defused key:
    the patched checkpoint mapping missed it); warn when the checkpoint only lacks them."""
    if not missing:
        return
    from defuser.engine.kinds import defused_kind

    paths = [f"{name}." for name, module in model.named_modules() if name and defused_kind(module) is not None]
    defused = {key for key in missing if key.startswith(tuple(paths))}
    if not defused:
        return
    what = (
        f"{type(model).__name__}.from_pretrained left {len(defused)} weight(s) of defused blocks missing "
        f"(randomly initialised): {_shown(defused)}"
    )
    if unexpected:
        raise ConversionError(
            f"{what}; the checkpoint keys {_shown(unexpected)} were not loaded: the pre-load checkpoint "
            "mapping did not take them to the defused blocks (a defuser bug, please report it)"
        )
    logger.warning("%s; the checkpoint does not hold them", what)
