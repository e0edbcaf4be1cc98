"""Models built with defused blocks (``replace_fused_blocks``) and loaded with a distributed plan.

transformers reads a model's parallel plans (``tp_plan``, ``ep_plan``) in ``post_init`` and
applies them in ``from_pretrained`` before the weights load.  Those plans name the fused
structure: ``experts.gate_up_proj: packed_colwise``, ``experts: moe_tp_experts``, ... .  On a
model built with defused blocks they must neither shard nor reduce anything the defused
structure does not match, or the output is counted once per rank.  Two things keep them exact:

* :func:`rewrite_plans` runs after every ``post_init`` while patches are active and rewrites the
  plan entries naming a defused block: entries for fused tensors that no longer exist are
  dropped (the per-expert weights stay replicated), and with transformers 5.3 the experts'
  module entries and the ``ep_router`` entry of their MoE block go too (that router remaps
  expert indices for sharded experts).
* :class:`StyleOverrides` puts, in transformers' registry of parallel styles, a stand-in for each
  experts style (``moe_tp_experts``, and 5.3's router and experts styles) that hands defused
  experts to defuser (:func:`defuser.engine.sharded.install_experts_tp_forward`, which reduces
  exactly what is sharded) and every other module to the stock style.  A user plan naming the
  stock style on defused experts is therefore exact too.

Both are installed while ``replace_fused_blocks`` patches some model type and undone when none is
(:func:`sync_distributed_preload`, called by the pre-load patching).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from torch import nn

from defuser.engine.distributed import legacy_api, wildcard_path

__all__ = [
    "StyleOverrides",
    "install_distributed_preload",
    "restore_distributed_preload",
    "rewrite_plans",
    "sync_distributed_preload",
]

logger = logging.getLogger(__name__)

_lock = threading.RLock()


def _defused_blocks(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(experts, dense)``: wildcard path -> layout of the defused experts modules and of the
    split dense MLPs of ``model`` (paths relative to it)."""
    from defuser.engine.dense import JoinedGateUp
    from defuser.engine.experts import DefusedExperts

    experts: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for path, module in model.named_modules():
        if isinstance(module, DefusedExperts):
            experts.setdefault(wildcard_path(path), module.layout)
            continue
        joined = next((value for value in vars(module).values() if isinstance(value, JoinedGateUp)), None)
        if joined is not None:
            dense.setdefault(wildcard_path(path), joined.layout)
    return experts, dense


def rewrite_plans(model: nn.Module) -> dict[str, str]:
    """Drop from ``model``'s tensor- and expert-parallel plans the entries that name a fused
    structure its defused blocks replaced (see the module docstring); returns what was dropped."""
    from defuser.engine.fuse import fused_names

    experts, dense = _defused_blocks(model)
    if not experts and not dense:
        return {}
    legacy = legacy_api()
    dropped_keys: set[str] = set()
    for path, layout in experts.items():
        dropped_keys.update(f"{path}.{name}" for name in fused_names(layout))
        if legacy:
            dropped_keys.add(path)
    for path, layout in dense.items():
        dropped_keys.add(f"{path}.{layout.fused_name}")
        dropped_keys.update(f"{path}.{layout.fused_name}.{part}" for part in ("weight", "bias"))
    block_paths = {path.rpartition(".")[0] for path in experts}
    dropped: dict[str, str] = {}
    for attribute in ("_tp_plan", "_ep_plan"):
        plan = getattr(model, attribute, None)
        if not isinstance(plan, dict):
            continue
        for key in list(plan):
            style = plan[key]
            # transformers 5.3: a router remapping indices for experts that are no longer sharded.
            legacy_router = legacy and style == "ep_router" and key.rpartition(".")[0] in block_paths
            if key in dropped_keys or legacy_router:
                dropped[key] = plan.pop(key)
    if dropped:
        logger.info(
            "%s: parallel-plan entries for fused blocks that defused blocks replaced, left out: %s",
            type(model).__name__,
            ", ".join(f"{key}: {style}" for key, style in sorted(dropped.items())),
        )
    return dropped


def _parallel_registry() -> Any | None:
    """transformers' registry of parallel styles (either API generation), or None without one."""
    for module_name in ("transformers.distributed.parallel_utils", "transformers.integrations.tensor_parallel"):
        try:
            module = __import__(module_name, fromlist=["ALL_PARALLEL_STYLES"])
        except ImportError:
            continue
        registry = getattr(module, "ALL_PARALLEL_STYLES", None)
        if registry is not None:
            return registry
    return None


def _is_defused_experts(module: nn.Module) -> bool:
    from defuser.engine.experts import DefusedExperts

    return isinstance(module, DefusedExperts)


class _ExpertsStyle:
    """Stands in the registry for a stock experts style: defused experts go to defuser, other
    modules to the stock style (every other attribute is the stock style's)."""

    def __init__(self, stock: Any):
        self.wrapped = stock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    # transformers 5.24+: module styles install a forward.
    def install_forward(self, module: nn.Module, mesh: Any, *args: Any, **kwargs: Any) -> nn.Module:
        if _is_defused_experts(module):
            from defuser.engine.sharded import install_experts_tp_forward

            return install_experts_tp_forward(module, mesh)
        return self.wrapped.install_forward(module, mesh, *args, **kwargs)

    # transformers 5.3: module styles attach forward hooks.
    def prepare_module_tp(self, module: nn.Module, device_mesh: Any, **kwargs: Any) -> Any:
        if _is_defused_experts(module):
            # The defused experts of a 5.3 model are replicated (see rewrite_plans): nothing to reduce.
            return None
        return self.wrapped.prepare_module_tp(module, device_mesh, **kwargs)


class StyleOverrides:
    """The stand-ins :class:`_ExpertsStyle` put in transformers' style registry, and their undo."""

    # Styles a plan puts on an experts module itself.
    NAMES = ("moe_tp_experts",)

    def __init__(self) -> None:
        self.installed: dict[str, Any] = {}  # name -> the registry's local entry before (None: none)

    def install(self) -> None:
        """Put the stand-ins in the registry (idempotent)."""
        registry = _parallel_registry()
        if registry is None:
            return
        local = getattr(registry, "_local_mapping", None)
        for name in self.NAMES:
            if name in self.installed or name not in registry:
                continue
            current = registry[name]
            if isinstance(current, _ExpertsStyle):
                continue
            self.installed[name] = local.get(name) if isinstance(local, dict) else None
            registry[name] = _ExpertsStyle(current)

    def restore(self) -> None:
        """Give the registry back its stock entries."""
        registry = _parallel_registry()
        if registry is None:
            self.installed.clear()
            return
        for name, before in self.installed.items():
            if before is None:
                registry.__delitem__(name)
            else:
                registry[name] = before
        self.installed.clear()


_overrides = StyleOverrides()
_post_init_original: Any = None


def _post_init_rewriting_plans(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    result = _post_init_original(self, *args, **kwargs)
    rewrite_plans(self)
    return result


def sync_distributed_preload(active: bool) -> None:
    """Installed while some model type is patched (``active``), undone when none is."""
    if active:
        install_distributed_preload()
    else:
        restore_distributed_preload()


def install_distributed_preload() -> None:
    """Rewrite the plans of models built from now on and put the style stand-ins in place (idempotent)."""
    global _post_init_original
    from transformers import PreTrainedModel

    with _lock:
        _overrides.install()
        if _post_init_original is None:
            _post_init_original = PreTrainedModel.__dict__["post_init"]
            PreTrainedModel.post_init = _post_init_rewriting_plans


def restore_distributed_preload() -> None:
    """Undo :func:`install_distributed_preload`."""
    global _post_init_original
    from transformers import PreTrainedModel

    with _lock:
        _overrides.restore()
        if _post_init_original is not None:
            PreTrainedModel.post_init = _post_init_original
            _post_init_original = None
