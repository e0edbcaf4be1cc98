"""Module hooks follow a replaced module to its replacement, or the replacement is refused.

Users hook exactly the modules defuser replaces: an activation-capture or calibration hook on
``mlp.experts`` sees the experts module, ``(hidden_states, top_k_index, top_k_weights)`` and
the experts' output.  The defused module takes the same arguments and returns the same
output, so its replacement runs the same hooks: forward and forward pre-hooks (the
``with_kwargs`` and ``always_call`` variants too) and full backward (pre-)hooks.  The
replacement does not get copies: it shares the replaced module's hook dictionaries, so a
``RemovableHandle`` the user holds still removes its hook, and a hook registered on either
object is seen by both.

What cannot follow is refused with :class:`HookError`, naming the module and the hooks:

- hooks on a module the replacement drops (a dense MLP's fused ``gate_up_proj`` Linear,
  split into ``gate_proj`` and ``up_proj``; a per-expert Linear when fusing back);
- gradient hooks on a tensor the replacement drops (``tensor.register_hook``,
  ``register_post_accumulate_grad_hook``): per-expert weights are other tensors;
- old-style ``register_backward_hook`` hooks, which see the gradients of the module's last
  autograd operation, not its inputs and outputs (the defused forward ends differently);
- state-dict and load-state-dict hooks, which are written for the replaced module's keys.

accelerate's ``_hf_hook`` is not an ``nn.Module`` hook; :mod:`defuser.engine.offload` handles it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FUSION_ADVICE", "HookError", "ModuleHooks", "module_hooks"]

# The hook dictionaries a replacement shares with the module it replaces.  The ``with_kwargs``
# and ``always_called`` ones are keyed by the ids of hooks in the first two.
_CARRIED = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
# Dictionaries whose hooks are refused, by the registration call a user would recognise.
_REFUSED = {
    "_state_dict_hooks": "state-dict hooks",
    "_state_dict_pre_hooks": "state-dict pre-hooks",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hooks",
    "_load_state_dict_post_hooks": "load-state-dict post-hooks",
}
_KINDS = {
    "_forward_pre_hooks": "forward pre-hooks",
    "_forward_hooks": "forward hooks",
    "_backward_pre_hooks": "backward pre-hooks",
    "_backward_hooks": "backward hooks",
    **_REFUSED,
}


_CONVERSION_ADVICE = "remove these hooks before converting and register them on the new modules"
FUSION_ADVICE = "remove these hooks before fusing back and register them on the fused module"


class HookError(RuntimeError):
    """Hooks registered on a module that is being replaced cannot follow the replacement."""


def _hook_name(hook: Callable) -> str:
    function = getattr(hook, "func", hook)  # functools.partial
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


# FSDP registers hooks of its own on the modules it wraps (state-dict and forward hooks); a
# module converted shard by shard gets them anew from its own wrapping, so they are machinery
# to leave behind, not a user's hooks to carry over or refuse.
_MACHINERY_PREFIXES = ("torch.distributed.fsdp.",)


def _is_machinery(hook: Callable) -> bool:
    return _hook_name(hook).startswith(_MACHINERY_PREFIXES)


def _user_hooks(hooks: dict | None) -> list[Callable]:
    return [hook for hook in (hooks or {}).values() if not _is_machinery(hook)]


def _hooks_of(module: nn.Module) -> list[str]:
    """``"forward hooks (name, ...)"`` for each kind of user hook registered on ``module``."""
    found = []
    for attribute, kind in _KINDS.items():
        hooks = _user_hooks(module.__dict__.get(attribute))
        if hooks:
            found.append(f"{kind} ({', '.join(_hook_name(hook) for hook in hooks)})")
    return found


def _only_machinery(module: nn.Module) -> bool:
    """True when every hook ``module`` has in the carried dictionaries is FSDP's own."""
    state = module.__dict__
    found = [hook for name in _KINDS for hook in (state.get(name) or {}).values()]
    return bool(found) and all(map(_is_machinery, found))


def _tensor_hooks(tensor: torch.Tensor) -> list[str]:
    found = []
    for attribute, kind in (
        ("_backward_hooks", "register_hook"),
        ("_post_accumulate_grad_hooks", "register_post_accumulate_grad_hook"),
    ):
        hooks = getattr(tensor, attribute, None)
        if hooks:
            found.append(f"{kind} ({', '.join(_hook_name(hook) for hook in hooks.values())})")
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


@dataclass
class ModuleHooks:
    """The hooks of a module tree about to be replaced (see :func:`module_hooks`)."""

    path: str
    root: nn.Module
    # (full path, module) of every module of the tree, root included, and of every tensor.
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def follow(self, replacement: nn.Module, advice: str = _CONVERSION_ADVICE) -> None:
        """Give ``replacement`` the root's hooks, or raise :class:`HookError` (changing
        nothing) when some hook cannot follow it; ``advice`` ends its message."""
        problems = [f"{self.path} has {kind}" for kind in self._refused_on_root(replacement is not self.root)]
        # Hooks below the root are rare: the replacement's tree is walked only when there are some.
        hooked_modules = [(path, module, hooks) for path, module in self.modules[1:] if (hooks := _hooks_of(module))]
        hooked_tensors = [(path, tensor, hooks) for path, tensor in self.tensors if (hooks := _tensor_hooks(tensor))]
        if hooked_modules or hooked_tensors:
            kept_modules = {id(module) for module in replacement.modules()}
            kept_tensors = {id(tensor) for module in replacement.modules() for tensor in _direct_tensors(module)}
            for path, module, hooks in hooked_modules:
                if id(module) not in kept_modules and module is not self.root:
                    problems.append(f"{path} has {', '.join(hooks)} and is not part of what replaces it")
            for path, tensor, hooks in hooked_tensors:
                if id(tensor) not in kept_tensors:
                    problems.append(f"{path} has gradient hooks {', '.join(hooks)} and is not part of what replaces it")
        if replacement is not self.root:
            problems += self._conflicts(replacement)
        if problems:
            raise HookError(f"{'; '.join(problems)}: {advice}")
        if replacement is not self.root:
            self._share(replacement)

    def _refused_on_root(self, replaced: bool) -> list[str]:
        """Hooks of the root that cannot stay: state-dict hooks (its keys change whether it is
        replaced or split in place) and, when it is replaced, old-style backward hooks."""
        state = self.root.__dict__
        refused = []
        for name, kind in _REFUSED.items():
            hooks = _user_hooks(state.get(name))
            if hooks:
                refused.append(f"{kind} ({', '.join(map(_hook_name, hooks))}), written for its keys")
        if replaced and state.get("_backward_hooks") and state.get("_is_full_backward_hook") is False:
            names = ", ".join(map(_hook_name, state["_backward_hooks"].values()))
            refused.append(
                f"register_backward_hook hooks ({names}), which see the gradients of its last operation rather than "
                "of its inputs and outputs (use register_full_backward_hook)"
            )
        return refused

    def _conflicts(self, replacement: nn.Module) -> list[str]:
        """The replacement's own hooks, which sharing the root's dictionaries would lose."""
        if _only_machinery(self.root):
            return []  # nothing of the user's to share: the replacement keeps its own
        own = []
        for name in _CARRIED:
            theirs, mine = self.root.__dict__.get(name), replacement.__dict__.get(name)
            if mine and mine is not theirs and theirs:
                own.append(name)
        if not own:
            return []
        return [f"{self.path} and its replacement {type(replacement).__name__} both have hooks ({', '.join(own)})"]

    def _share(self, replacement: nn.Module) -> None:
        if _only_machinery(self.root):
            return  # FSDP's hooks stay with the module they were made for
        state = replacement.__dict__
        for name in _CARRIED:
            theirs = self.root.__dict__.get(name)
            if theirs is not None and (theirs or not state.get(name)):
                state[name] = theirs
        if self.root.__dict__.get("_backward_hooks"):
            state["_is_full_backward_hook"] = self.root.__dict__.get("_is_full_backward_hook")


def _direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def module_hooks(root: nn.Module, path: str) -> ModuleHooks:
    """Record ``root``'s tree (at ``path`` in the model) before it is replaced, for
    :meth:`ModuleHooks.follow` once the replacement is built."""
    hooks = ModuleHooks(path, root)
    for name, module in root.named_modules(remove_duplicate=False):
        hooks.modules.append((_join(path, name), module))
        for tensor_name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None:
                hooks.tensors.append((_join(_join(path, name), tensor_name), tensor))
    return hooks
