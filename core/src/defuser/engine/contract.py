"""What may be defused from the decorator's flags alone, and what must be refused instead.

``@use_experts_implementation`` records flags that describe the fused tensors and the forward
of the class it wraps.  They say nothing about a subclass that overrides ``forward`` (ergo's
``ErgoExperts`` normalises each route after its expert) or about tensors the flags do not name
(quantisation scales, an extra norm): defusing such a module from the flags would drop that
part of its computation without a word.  The generic engine, and a plugin for a class it does
not declare, refuse such a module instead, with the reason; a plugin declaration that
describes the class is what makes it defusable.

Detection runs these checks before anything changes; ``convert_model`` then raises one
``ConversionError`` naming every refused module it would have converted.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from defuser._hf import is_experts_forward
from defuser.engine.candidates import ExpertsLayout

__all__ = [
    "carried_tensor_prefixes",
    "class_refusal",
    "contract_refusal",
    "decorated_class",
    "is_experts_wrapper",
    "looks_fused",
]

# Methods whose override changes what a decorated class computes.
_COMPUTING_METHODS = ("forward", "__call__")


def is_experts_wrapper(function: Any) -> bool:
    """True for the ``forward`` that ``@use_experts_implementation`` installs (it closes over the
    class's original forward; ``functools.wraps`` hides its name)."""
    return is_experts_forward(function)


def decorated_class(cls: type) -> type | None:
    """The nearest class of ``cls``'s hierarchy that ``@use_experts_implementation`` wrapped."""
    for klass in cls.__mro__:
        forward = vars(klass).get("forward")
        if forward is not None and is_experts_wrapper(forward):
            return klass
    return None


def _overrides(cls: type, base: type) -> list[str]:
    """``Class.method`` for each computing method defined between ``cls`` and ``base``."""
    found = []
    for klass in cls.__mro__:
        if klass is base:
            break
        found += [f"{klass.__name__}.{name}" for name in _COMPUTING_METHODS if name in vars(klass)]
    return found


def carried_tensor_prefixes(layout: ExpertsLayout) -> tuple[str, ...]:
    """Name prefixes of the non-fused tensors the defused experts module keeps (same names)."""
    return ("post_expert_norm.",) if layout.has_post_expert_norm else ()


def _undescribed_tensors(module: nn.Module, layout: ExpertsLayout) -> list[str]:
    consumed = {tensor.name for tensor in layout.tensors()}
    carried = carried_tensor_prefixes(layout)
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in module.named_buffers(remove_duplicate=False)]
    return [name for name in names if name not in consumed and not name.startswith(carried)]


def class_refusal(cls: type) -> str:
    """Why instances of ``cls`` must not be defused from the flags of the decorated class it
    derives from: a class in between overrides what it computes.  Empty when none does."""
    base = decorated_class(cls)
    overridden = _overrides(cls, base) if base is not None else []
    if base is None or not overridden:
        return ""
    return (
        f"{', '.join(overridden)} overrides the forward of the decorated {base.__name__}, and the decorator's "
        f"flags describe only {base.__name__}'s projections; no installed plugin declares what {cls.__name__} computes"
    )


def contract_refusal(module: nn.Module, layout: ExpertsLayout) -> str:
    """Why ``module`` must not be defused from its decorator's flags (``layout``); empty when it
    may.  Only for layouts read from the flags: a plugin declaration vouches for its own."""
    overridden = class_refusal(type(module))
    if overridden:
        return overridden
    cls = type(module)
    unknown = _undescribed_tensors(module, layout)
    if unknown:
        return (
            f"{cls.__name__} holds tensors its decorator's flags do not describe ({', '.join(unknown[:6])}"
            f"{', ...' if len(unknown) > 6 else ''}); no installed plugin declares what they do"
        )
    return ""


def looks_fused(module: nn.Module) -> bool:
    """True for a module holding fused weights: a parameter of 3 or more dims, a fused gate-up
    ``nn.Linear``, or (flattened experts) an ``*Expert*`` class holding parameters."""
    if any(tensor is not None and tensor.ndim >= 3 for tensor in module._parameters.values()):
        return True
    if isinstance(module._modules.get("gate_up_proj"), nn.Linear):
        return True
    return "Expert" in type(module).__name__ and next(module.parameters(), None) is not None
