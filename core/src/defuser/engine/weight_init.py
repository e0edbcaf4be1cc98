"""transformers' weight init on defused modules, without fused names on them otherwise.

A model class's ``_init_weights`` still names the fused tensors of the classes it knows
(``init.normal_(module.gate_up_proj, ...)``, or ``module.experts.gate_up_proj`` from the MoE
block), and the defused module stands where such a class stood (pre-load patching rebinds the
class name to it).  Its per-expert ``nn.Linear`` weights are initialised as Linears by the same
call, so the fused names only have to be harmless there: while transformers initialises
weights (:func:`initializing_weights` is True), a defused module answers a fused tensor name
with a structure-only placeholder on the meta device, which the init functions leave as they
are.  Outside it, ``hasattr(module, "gate_up_proj")`` is False.

The window is opened by a wrapper around ``PreTrainedModel._initialize_weights`` (the per-module
step of ``initialize_weights``), installed once by :func:`install_weight_init_window`.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from typing import Any

__all__ = ["initializing_weights", "install_weight_init_window"]

_initializing: contextvars.ContextVar[bool] = contextvars.ContextVar("defuser_initializing_weights", default=False)
_lock = threading.Lock()
_installed = False


def initializing_weights() -> bool:
    """True while transformers initialises weights (inside ``_initialize_weights``)."""
    return _initializing.get()


def install_weight_init_window() -> None:
    """Wrap ``PreTrainedModel._initialize_weights`` so that it runs inside the init window
    (idempotent; classes that override ``_initialize_weights`` keep their own)."""
    global _installed
    with _lock:
        if _installed:
            return
        from transformers import PreTrainedModel

        stock = PreTrainedModel.__dict__.get("_initialize_weights")
        if stock is None or getattr(stock, "__defuser_window__", False):
            _installed = True
            return

        @functools.wraps(stock)
        def _initialize_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = _initializing.set(True)
            try:
                return stock(self, *args, **kwargs)
            finally:
                _initializing.reset(token)

        _initialize_weights.__defuser_window__ = True  # type: ignore[attr-defined]
        PreTrainedModel._initialize_weights = _initialize_weights  # type: ignore[method-assign]  # the window
        _installed = True
