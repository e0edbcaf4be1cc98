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
import re
import threading
import weakref
from typing import Any

from torch import nn

from defuser.engine.distributed import legacy_api, wildcard_path

__all__ = [
    "StyleOverrides",
    "expert_parallel_holdable",
    "held_target",
    "hold_for_expert_parallel",
    "install_distributed_preload",
    "model_of",
    "refuse_presliced_fused",
    "restore_distributed_preload",
    "rewrite_plans",
    "sync_distributed_preload",
    "tensor_parallel_shardable",
]

logger = logging.getLogger(__name__)

_lock = threading.RLock()


def _defused_blocks(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(experts, dense)``: wildcard path -> layout of the defused experts modules and of the
    split dense MLPs of ``model`` (paths relative to it).  Each defused experts module is told
    its path and its model (the outermost one wins: its ``post_init`` runs last), which the
    expert-parallel stand-in needs before the weights load."""
    from defuser.engine.dense import split_dense_layout
    from defuser.engine.experts import DefusedExperts

    experts: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    # ``named_modules`` order and paths, without entering defused experts modules: nothing is
    # defused inside them, and their per-expert Linears are most of the model's modules.
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        path, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, DefusedExperts):
            experts.setdefault(wildcard_path(path), module.layout)
            module.__dict__["_defuser_path"] = path
            _models[module] = weakref.ref(model)
            continue
        split = split_dense_layout(module)
        if split is not None:
            dense.setdefault(wildcard_path(path), split)
        prefix = f"{path}." if path else ""
        children = [(f"{prefix}{name}", child) for name, child in module._modules.items() if child is not None]
        pending.extend(reversed(children))
    return experts, dense


# Defused experts built before load -> their (outermost) model, known from its post_init.
_models: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def model_of(module: nn.Module) -> nn.Module | None:
    """The model a defused experts module was built in (before load), while both exist."""
    found = _models.get(module)
    return found() if found is not None else None


def tensor_parallel_shardable(layout: Any) -> str | None:
    """None when defuser shards per-expert Linears of ``layout`` exactly under a tensor-parallel
    plan (gate/up by columns, down by rows), else why not."""
    if layout.contract != "routed" or layout.identity_experts or layout.has_post_expert_norm:
        return "its forward contract, identity experts or per-expert norm"
    if layout.flattened or layout.separate_gate_up or layout.is_transposed or layout.transposed_down:
        return "its flattened, separate or transposed fused tensors"
    if layout.has_gate and not layout.is_concatenated:
        return "its interleaved gate/up rows"
    if layout.has_bias:
        return "its biases"
    if layout.gate_style != "default":
        return "its own gate function, which may read the full intermediate size"
    return None


def _per_expert_tp_entries(path: str, layout: Any, plan: dict[str, str]) -> dict[str, str] | None:
    """The per-expert entries standing for transformers' tensor-parallel entries of fused experts
    at ``path`` (``packed_colwise``/``colwise`` gate-up, ``rowwise`` down, ``moe_tp_experts``), or
    None when ``plan`` does not shard them that way or the layout cannot be sharded exactly."""
    first = "packed_colwise" if layout.has_gate else "colwise"
    entries = (plan.get(f"{path}.{layout.first_name}"), plan.get(f"{path}.{layout.down_name}"), plan.get(path))
    if entries != (first, "rowwise", "moe_tp_experts"):
        return None
    reason = tensor_parallel_shardable(layout)
    if reason is not None:
        logger.info("%s: experts left replicated under the tensor-parallel plan because of %s", path, reason)
        return None
    projections = ["up_proj", "down_proj"] + (["gate_proj"] if layout.has_gate else [])
    # Parameter entries only: the Linears get no per-expert hooks, the experts module sums once.
    return {f"{path}.*.{name}.weight": "rowwise" if name == "down_proj" else "colwise" for name in projections}


def rewrite_plans(model: nn.Module) -> dict[str, str]:
    """Rewrite the entries of ``model``'s tensor- and expert-parallel plans that name a fused
    structure its defused blocks replaced (see the module docstring); returns what was dropped."""
    from defuser.engine.fuse import fused_names

    experts, dense = _defused_blocks(model)
    if not experts and not dense:
        return {}
    legacy = legacy_api()
    dropped_keys: set[str] = set()
    added: dict[str, str] = {}
    tp_plan = getattr(model, "_tp_plan", None)
    for path, layout in experts.items():
        if not legacy and isinstance(tp_plan, dict):
            added.update(_per_expert_tp_entries(path, layout, tp_plan) or {})
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
    if added:
        tp_plan.update(added)
    if dropped:
        logger.info(
            "%s: parallel-plan entries for fused blocks that defused blocks replaced: %s dropped%s",
            type(model).__name__,
            ", ".join(f"{key}: {style}" for key, style in sorted(dropped.items())),
            f"; {', '.join(f'{key}: {style}' for key, style in sorted(added.items()))} added" if added else "",
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
    """Stands in the registry for the stock experts style ``name``: defused experts go to defuser,
    other modules to the stock style (every other attribute is the stock style's)."""

    def __init__(self, name: str, stock: Any):
        self.name = name
        self.wrapped = stock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    # transformers 5.24+: module styles install a forward.
    def install_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if not _is_defused_experts(module):
            return self.wrapped.install_forward(module, *args, **kwargs)
        # TP styles take (module, mesh, ...); the EP dispatch style takes ep_mesh= and tp_mesh= by keyword.
        mesh = args[0] if args else kwargs.get("mesh", kwargs.get("ep_mesh"))
        if self.name == "ep_dispatch_experts":
            hold_for_expert_parallel(module, mesh, kwargs.get("tp_mesh"), kwargs.get("ep_implementation", "auto"))
            return self.wrapped.install_forward(module, *args, **kwargs)
        from defuser.engine.sharded import install_experts_tp_forward
        from defuser.engine.sharded_convert import record_tensor_parallel

        record_tensor_parallel(module, mesh)
        return install_experts_tp_forward(module, mesh, module.__dict__.get("_defuser_path", ""))

    # transformers 5.3: module styles attach forward hooks.
    def prepare_module_tp(self, module: nn.Module, device_mesh: Any, **kwargs: Any) -> Any:
        if _is_defused_experts(module):
            # The defused experts of a 5.3 model are replicated (see rewrite_plans): nothing to reduce.
            return None
        return self.wrapped.prepare_module_tp(module, device_mesh, **kwargs)


def expert_parallel_holdable(layout: Any) -> str | None:
    """None when defused experts of ``layout`` can hold a slice of the experts exactly, else why not."""
    if layout.contract != "routed" or layout.identity_experts:
        return "its forward contract or identity experts (their indices clash with the other ranks' marker)"
    if layout.flattened or layout.has_post_expert_norm:
        return "its flattened storage or per-expert norm"
    return None


# Path of a defused experts module holding a slice of the experts -> its first expert and the
# module (an entry lapses with it), for the split of fused checkpoint tensors (see held_target).
_held_first: dict[str, tuple[int, weakref.ref]] = {}
_SPLIT_TARGET = re.compile(r"^(?P<path>.+)\.0\.(?P<rest>(?:gate_proj|up_proj|down_proj)\.(?:weight|bias))$")


def held_target(key: str) -> str:
    """The key a fused checkpoint tensor of a module holding a slice of the experts loads through.

    A fused tensor is split by a converter that transformers only runs when its target (expert
    0's first tensor) is a key of the model; a rank holding experts 4..7 has no expert 0, so the
    target becomes its first expert's."""
    if not _held_first:
        return key
    match = _SPLIT_TARGET.match(key)
    if match is None:
        return key
    path = match["path"]
    for held_path, (first, module) in list(_held_first.items()):
        if module() is None:
            del _held_first[held_path]
        elif held_path == path or held_path.endswith(f".{path}") or path.endswith(f".{held_path}"):
            return f"{path}.{first}.{match['rest']}"
    return key


def refuse_presliced_fused(module: nn.Module, path: str, pieces: dict[str, Any]) -> None:
    """Raise when a fused checkpoint tensor reaches defused experts whose per-expert tensors are
    sharded DTensors: transformers' loader then hands over only the slice that the first
    per-expert tensor's placement selects (a block of experts, not a slice of each), from which
    the others cannot be built."""
    from defuser.engine.distributed import is_dtensor
    from defuser.engine.sharded import expert_parameters

    for projection, _, tensor_name, tensor in expert_parameters(module):
        if not is_dtensor(tensor):
            continue
        mesh = tensor.device_mesh
        if any(placement.is_shard() and mesh.size(dim) > 1 for dim, placement in enumerate(tensor.placements)):
            names = ", ".join(sorted(pieces))
            raise ValueError(
                f"{path}: the checkpoint holds {names} fused, and its per-expert weights ({projection}.{tensor_name}, "
                f"{tuple(tensor.placements)}) are sharded by the plan, so transformers hands over only a block of "
                "experts of it. Load a per-expert checkpoint instead (`defuser convert SRC DST` writes one, or "
                "save the model defused), or load the fused model and call convert_model"
            )


def hold_for_expert_parallel(module: nn.Module, ep_mesh: Any, tp_mesh: Any, ep_implementation: str) -> nn.Module:
    """Make defused experts built before load hold only this rank's experts under an expert-parallel
    plan (before the weights load, so only those are read), and arrange loading and saving."""
    from torch.distributed.tensor import Shard

    from defuser.engine.distributed import DistributedPlanError
    from defuser.engine.fuse import fused_names
    from defuser.engine.sharded import hold_experts
    from defuser.engine.sharded_convert import ShardedExperts
    from defuser.engine.sharded_save import gather_held_experts_on_save

    path = module.__dict__.get("_defuser_path", type(module).__name__)
    reason = expert_parallel_holdable(module.layout)
    if reason is not None:
        raise DistributedPlanError(f"{path}: defused experts cannot be split by expert because of {reason}")
    total, size = module.num_experts, ep_mesh.size()
    if total % size:
        raise DistributedPlanError(f"{path}: {total} experts do not split evenly over {size} expert-parallel ranks")
    count = total // size
    first = ep_mesh.get_local_rank() * count
    names = fused_names(module.layout)
    shapes = {name: tuple(shape) for name, shape in (module.__dict__.get("_fused_tensor_shapes") or {}).items()}
    hold_experts(module, first, count)
    module.__dict__["_is_expert_parallel"] = True
    module.__dict__["_defuser_sharded"] = ShardedExperts(
        "expert",
        ep_mesh,
        dict.fromkeys(names, (Shard(0),)),
        shapes,
        ep_mesh,
        tp_mesh=tp_mesh,
        ep_implementation=ep_implementation or "auto",
    )
    _held_first[path] = (first, weakref.ref(module))
    root = model_of(module)
    if root is not None:
        # Checkpoint keys of the experts other ranks hold are expected here, not unexpected.
        held = "|".join(str(number) for number in range(first, first + count))
        pattern = re.escape(wildcard_path(path)).replace(r"\*", r"\d+")
        ignored = getattr(root, "_keys_to_ignore_on_load_unexpected", None)
        ignored = set(ignored or ())
        ignored.add(rf"^{pattern}\.(?!(?:{held})\.)\d+\.")
        root._keys_to_ignore_on_load_unexpected = ignored
        gather_held_experts_on_save(root)
    return module


class StyleOverrides:
    """The stand-ins :class:`_ExpertsStyle` put in transformers' style registry, and their undo."""

    # Styles a plan puts on an experts module itself.
    NAMES = ("moe_tp_experts", "ep_dispatch_experts")

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
            registry[name] = _ExpertsStyle(name, current)

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
            if PreTrainedModel.__dict__.get("post_init") is _post_init_rewriting_plans:
                PreTrainedModel.post_init = _post_init_original
            _post_init_original = None
