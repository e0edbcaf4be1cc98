"""Skeletons: a fused module without its fused tensors, kept by its defused form for fusing back.

Defusion keeps a *skeleton* of every module it replaces: a shallow copy of the fused module
(same class, plain attributes, children, hooks) whose fused tensors are removed, so it holds
no weight bytes.  Fusing back (:mod:`defuser.engine.fuse`) fills a fresh copy of it.  Defusion
(:mod:`.experts`, :mod:`.dense`, :mod:`.parallel`) and fusing both import this module, and it
imports neither.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["skeleton_of"]


# What accelerate's ``add_hook_to_module`` puts on a dispatched module: its hook, and a
# ``forward`` (and the saved original) bound to that module object.
_DISPATCH_STATE = ("_hf_hook", "_old_forward", "forward")


def skeleton_of(module: nn.Module, dropped: list[str]) -> nn.Module:
    """A shallow copy of ``module`` without the tensors named in ``dropped`` (dotted names reach
    into children, which are shallow-copied the same way).  It holds no weight bytes of them.

    A copy of a module dispatched by accelerate leaves its hook behind: the hooked ``forward``
    is bound to ``module`` and would run it, not the copy (fusing a dispatched model back
    gives the fused module hooks of its own, see :mod:`defuser.engine.offload`)."""
    skeleton = copy.copy(module)  # nn.Module copies its __dict__ shallowly
    if "_hf_hook" in skeleton.__dict__:
        for name in _DISPATCH_STATE:
            skeleton.__dict__.pop(name, None)
    skeleton.__dict__["_parameters"] = dict(module._parameters)
    skeleton.__dict__["_buffers"] = dict(module._buffers)
    skeleton.__dict__["_modules"] = dict(module._modules)
    by_child: dict[str, list[str]] = {}
    for name in dropped:
        owner, _, rest = name.partition(".")
        if rest:
            by_child.setdefault(owner, []).append(rest)
        else:  # kept as None so that fusing back restores the tensor in its original order
            for tensors in (skeleton._parameters, skeleton._buffers):
                if name in tensors:
                    tensors[name] = None
    for child, names in by_child.items():
        held = module._modules.get(child)
        if held is not None:
            skeleton._modules[child] = skeleton_of(held, names)
    return skeleton
