"""Converting modules that transformers' distributed loading sharded, shard by shard, and back.

``convert_model`` hands every sharded candidate here (after :mod:`defuser.engine.distributed`
has refused what cannot be converted).  Fused experts are defused from a *local view*: a copy
of the fused module (its own class, without wrappers or hooks) holding this rank's shard of each
fused tensor as a plain tensor.  The family's plugin defuses that view as any other module, so
the per-expert weights are views of the local shard where the layout allows (copies of the
shard otherwise), and nothing is gathered.  Then:

* tensor parallel (fused experts sharded by transformers 5.24's ``packed_colwise``/``rowwise``
  plan under ``moe_tp_experts``): every per-expert weight becomes a DTensor over the ``tp``
  mesh with the placement transformers gives a dense MLP (gate/up ``Shard(0)``, down
  ``Shard(1)``), ``in_features``/``out_features`` stay the full sizes, and the experts module
  sums the partial outputs once (:func:`defuser.engine.sharded.install_experts_tp_forward`);
* expert parallel (``grouped_gemm`` + ``ep_dispatch_experts``): the defused module holds the
  rank's experts under their model-wide names (:func:`defuser.engine.sharded.hold_experts`) and
  gets transformers' own expert-parallel dispatch again, on the same meshes and implementation;
  under FSDP + expert parallel (one copy of each expert, ``efsdp`` of size 1) it is wrapped with
  ``fully_shard`` as transformers wraps fused experts;
* a dense MLP whose fused gate-up Linear is ``colwise_gather_output`` holds, per rank, whole
  halves (rank 0 the gate, rank 1 the up with 2 ranks), so the fused weight is gathered once
  (one MLP at a time) and each half is sharded again column-wise with the same style.

:func:`fuse_sharded` is the inverse for ``fuse_model``: the fused local tensors are rebuilt
(views of the same storage when untouched), wrapped as DTensors with the fused placements, and
the stock styles are installed again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout
from defuser.engine.distributed import (
    DistributedPlanError,
    ModuleSharding,
    is_dtensor,
    legacy_api,
    register_support,
)

__all__ = [
    "ShardedExperts",
    "defuse_sharded",
    "fuse_sharded",
    "install_expert_parallel",
    "is_sharded_defused",
    "record_tensor_parallel",
    "sharded_support",
]

logger = logging.getLogger(__name__)

_LEGACY = (
    "transformers 5.3 shards with plain tensors and forward hooks that defuser cannot carry over; call "
    "defuser.replace_fused_blocks(model_type) before from_pretrained (the defused experts are then replicated), "
    "or use transformers >= 5.24"
)


@dataclasses.dataclass(frozen=True)
class ShardedExperts:
    """What a sharded defused experts module needs to be fused back and saved: its kind
    (``"tensor"`` or ``"expert"``), meshes, the fused tensors' placements and full shapes."""

    kind: str
    mesh: Any  # tp mesh (tensor) or ep mesh (expert)
    placements: dict[str, tuple[Any, ...]]
    shapes: dict[str, tuple[int, ...]]
    mesh_for_placements: Any = None  # the mesh the fused placements refer to (efsdp x ep under FSDP)
    tp_mesh: Any = None
    ep_implementation: str = "auto"
    fsdp: dict[str, Any] | None = None


def _placements(sharding: ModuleSharding, name: str) -> tuple[Any, ...] | None:
    entry = sharding.placements.get(name)
    return None if entry is None else entry[1]


def _experts_support(candidate: Candidate, sharding: ModuleSharding) -> str | None:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if legacy_api():
        return _LEGACY
    layout = candidate.layout
    if not isinstance(layout, ExpertsLayout):
        return "only experts modules are converted under a plan here"
    if layout.contract != "routed" or layout.identity_experts or layout.has_post_expert_norm:
        return (
            f"its experts layout ({layout.contract} forward, identity experts or a per-expert norm) "
            "is not sharded exactly by defuser"
        )
    if layout.flattened:
        return "flattened experts storage is not converted under a plan"
    names = _fused_names(layout)
    module = candidate.module
    unknown = sorted(set(sharding.placements) - set(names))
    if unknown:
        return f"it holds sharded tensors defuser does not read ({', '.join(unknown)})"
    if sharding.style == "ep_dispatch_experts":
        implementation = sharding.closure.get("implementation")
        if implementation is None or not hasattr(implementation, "tp_mesh"):
            return "its expert-parallel dispatch is not the one defuser knows (no implementation with meshes)"
        for name in names:
            placements = _placements(sharding, name)
            if placements is None or placements[-1] != Shard(0):
                return f"{name} is not sharded by expert (Shard(0) on the 'ep' mesh): {placements}"
            tensor = _tensor(module, name)
            dims = tensor.device_mesh.mesh_dim_names or ()
            if dims[-1:] != ("ep",) or any(tensor.device_mesh.size(index) != 1 for index in range(len(dims) - 1)):
                shape = tuple(tensor.device_mesh.shape)
                return f"{name} lies on mesh {dims} {shape}: only the 'ep' dimension may split the experts"
        if sharding.fsdp is not None and sharding.fsdp != candidate.path:
            return f"its tensors belong to the FSDP unit at {sharding.fsdp!r}, not to the experts module"
        return None
    if sharding.style == "moe_tp_experts" and sharding.fsdp is None:
        from defuser.engine.distributed_preload import tensor_parallel_shardable

        reason = tensor_parallel_shardable(layout)
        if reason is not None:
            return f"defuser does not slice experts by columns exactly with {reason}"
        expected = {
            layout.first_name: (_StridedShard(1, split_factor=2),) if layout.has_gate else (Shard(1),),
            layout.down_name: (Shard(2),),
        }
        for name, wanted in expected.items():
            placements = _placements(sharding, name)
            if placements != wanted:
                return (
                    f"{name} is placed {placements}, not {wanted} (transformers' packed_colwise/rowwise experts plan)"
                )
        first = _tensor(module, layout.first_name)
        down = _tensor(module, layout.down_name)
        size = first.device_mesh.size()
        if down.device_mesh != first.device_mesh or first.device_mesh.ndim != 1:
            return "its experts tensors are not on one 1-D tensor-parallel mesh"
        rows = first.shape[1] // (2 if layout.has_gate else 1)
        if rows % size:
            return f"its intermediate size {rows} does not split evenly over {size} ranks"
        return None
    return "defuser converts fused experts sharded under 'moe_tp_experts' or 'ep_dispatch_experts' only"


def _dense_support(candidate: Candidate, sharding: ModuleSharding) -> str | None:
    from torch.distributed.tensor import Shard

    if legacy_api():
        return _LEGACY
    layout = candidate.layout
    if not isinstance(layout, DenseLayout):
        return "not a dense fused MLP"
    if sharding.fsdp is not None or sharding.style is not None:
        return "its MLP is managed by FSDP or wrapped by a parallel style"
    if sharding.child_styles != {layout.fused_name: "colwise_gather_output"}:
        return f"its fused gate-up Linear is wrapped by {sharding.child_styles}, not 'colwise_gather_output' alone"
    for part in ("weight", "bias"):
        placements = _placements(sharding, f"{layout.fused_name}.{part}")
        if part == "bias" and placements is None and _tensor(candidate.module, f"{layout.fused_name}.bias") is None:
            continue
        if placements != (Shard(0),):
            return f"{layout.fused_name}.{part} is placed {placements}, not (Shard(0),)"
    return None


def sharded_support(candidate: Candidate, sharding: ModuleSharding) -> str | None:
    """None when ``candidate`` in that sharded state converts exactly here, else why not."""
    if candidate.kind == "experts":
        return _experts_support(candidate, sharding)
    if candidate.kind == "dense":
        return _dense_support(candidate, sharding)
    return "parallel experts are not converted under a plan"


register_support("experts", _experts_support)
register_support("dense", _dense_support)


def _fused_names(layout: ExpertsLayout) -> list[str]:
    from defuser.engine.fuse import fused_names

    return fused_names(layout)


def _tensor(module: nn.Module, name: str) -> Any:
    from defuser.engine.candidates import resolve_tensor

    return resolve_tensor(module, name)


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _unwrapped_class(module: nn.Module) -> type:
    """The module's own class under FSDP's ``FSDP<Name>`` wrapper class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return type(module)
    cls = type(module)
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


# Instance attributes that a parallel style or FSDP sets on the module they wrap.
_WRAPPER_STATE = frozenset({"forward", "_is_hooked", "_fsdp_use_orig_params", "_is_fsdp_managed_module"})


def _local_view(module: nn.Module, names: list[str]) -> nn.Module:
    """A module of ``module``'s own class holding this rank's shard of ``names`` as plain tensors,
    the same children and plain attributes, and no installed forward or hooks."""
    from defuser.engine.layout import blank_module

    view = blank_module(_unwrapped_class(module))
    bookkeeping = set(view.__dict__)
    for key, value in vars(module).items():
        # The class's own state (``_is_expert_parallel`` read by its forward) comes along; what
        # nn.Module, the installed style and FSDP keep on the instance does not.
        if key in bookkeeping or key in _WRAPPER_STATE or key.startswith("__composable_api_state_key"):
            continue
        view.__dict__[key] = value
    view.__dict__["_modules"] = dict(module._modules)
    view.__dict__["_buffers"] = dict(module._buffers)
    parameters = dict(module._parameters)
    for name in names:
        if "." in name or parameters.get(name) is None:
            continue
        tensor = parameters[name]
        local = (tensor.to_local() if is_dtensor(tensor) else tensor).detach()
        if local.untyped_storage().nbytes() > local.numel() * local.element_size():
            # transformers' loader may leave a shard inside the full tensor it read: per-expert
            # views would keep all of it alive, so the shard is copied out (once the fused module
            # is released, this rank holds its shard only).
            local = local.clone()
        parameters[name] = nn.Parameter(local, requires_grad=tensor.requires_grad)
    view.__dict__["_parameters"] = parameters
    view.training = module.training
    return view


def defuse_sharded(manager: Any, candidate: Candidate, sharding: ModuleSharding, model: nn.Module) -> nn.Module:
    """The defused replacement of a sharded ``candidate`` (see the module docstring); the
    candidate's module is not changed (a dense MLP is split in place, under the caller's
    snapshot).  Every rank converts or none does: a failure on one rank is raised on all."""
    failure: BaseException | None = None
    replacement = None
    try:
        replacement = _defuse_sharded(manager, candidate, sharding, model)
    except Exception as error:  # re-raised below, once the other ranks know
        failure = error
    if not _all_ranks_agree(failure is None, _device_of(candidate.module)):
        if failure is not None:
            raise failure
        raise DistributedPlanError(f"{candidate.path}: another rank could not defuse it, so it stays fused here too")
    if logger.isEnabledFor(logging.INFO) and candidate.kind == "experts":
        from defuser.engine.sharded import local_expert_bytes

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        logger.info(
            "rank %d: %s defused shard by shard (%s), %d bytes of per-expert tensors here",
            rank,
            candidate.path,
            sharding.style or next(iter(sharding.child_styles.values()), "sharded"),
            local_expert_bytes(replacement),
        )
    return replacement


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return (tensor.to_local() if is_dtensor(tensor) else tensor).device
    return torch.device("cpu")


def _all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` on every rank (one all-reduce, on ``device`` as the backend wants; ``ok``
    itself without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _defuse_sharded(manager: Any, candidate: Candidate, sharding: ModuleSharding, model: nn.Module) -> nn.Module:
    if candidate.kind == "dense":
        return _defuse_dense(manager, candidate, sharding)
    layout: ExpertsLayout = candidate.layout
    names = _fused_names(layout)
    module = candidate.module
    view = _local_view(module, names)
    if sharding.style == "ep_dispatch_experts":
        local_count = _tensor(view, layout.first_name).shape[0]
        local_layout = dataclasses.replace(layout, num_experts=local_count)
    else:
        local_layout = layout
    replacement = manager.defuse(dataclasses.replace(candidate, module=view, layout=local_layout))
    from defuser.engine.experts import DefusedExperts

    if not isinstance(replacement, DefusedExperts):
        raise DistributedPlanError(
            f"{candidate.path}: plugin {candidate.plugin!r} defused the local shard into "
            f"{type(replacement).__name__}, which defuser cannot shard"
        )
    shapes = {name: tuple(_tensor(module, name).shape) for name in names}
    placements = {name: tuple(_tensor(module, name).placements) for name in names}
    if sharding.style == "ep_dispatch_experts":
        return _finish_expert_parallel(replacement, candidate, sharding, model, shapes, placements)
    return _finish_tensor_parallel(replacement, candidate, sharding, shapes, placements)


def _as_dtensor(tensor: torch.Tensor, mesh: Any, placement: Any, shape: tuple[int, ...]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(tensor, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


def shard_expert_linears(module: nn.Module, mesh: Any) -> None:
    """Turn the local per-expert tensors of ``module`` into DTensors over ``mesh`` (placements of
    :func:`~defuser.engine.sharded.tp_placement`), with the full sizes in the Linears."""
    from defuser.engine.sharded import expert_parameters, tp_placement

    size = mesh.size()
    for projection, linear, tensor_name, tensor in list(expert_parameters(module)):
        placement = tp_placement(projection, tensor_name)
        shape = list(tensor.shape)
        if tensor_name == "weight":
            dim = 0 if projection != "down_proj" else 1
            shape[dim] *= size
        elif projection != "down_proj":
            shape[0] *= size
        sharded = _as_dtensor(tensor.detach(), mesh, placement, tuple(shape))
        linear._parameters[tensor_name] = nn.Parameter(sharded, requires_grad=tensor.requires_grad)
        if tensor_name == "weight":
            linear.__dict__["out_features"], linear.__dict__["in_features"] = shape


def _finish_tensor_parallel(
    replacement: nn.Module,
    candidate: Candidate,
    sharding: ModuleSharding,
    shapes: dict[str, tuple[int, ...]],
    placements: dict[str, tuple[Any, ...]],
) -> nn.Module:
    from defuser.engine.sharded import install_experts_tp_forward

    mesh = sharding.closure.get("mesh") or _tensor(candidate.module, candidate.layout.first_name).device_mesh
    shard_expert_linears(replacement, mesh)
    replacement.__dict__["_defuser_sharded"] = ShardedExperts("tensor", mesh, placements, shapes, mesh)
    return install_experts_tp_forward(replacement, mesh, candidate.path)


def record_tensor_parallel(module: nn.Module, mesh: Any) -> None:
    """Remember, on defused experts built before load under a tensor-parallel plan, how their fused
    form is sharded (``packed_colwise``/``colwise`` gate-up, ``rowwise`` down) for fusing back."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    layout = module.layout
    first = (_StridedShard(1, split_factor=2),) if layout.has_gate else (Shard(1),)
    placements = {layout.first_name: first, layout.down_name: (Shard(2),)}
    shapes = {name: tuple(shape) for name, shape in (module.__dict__.get("_fused_tensor_shapes") or {}).items()}
    module.__dict__["_defuser_sharded"] = ShardedExperts("tensor", mesh, placements, shapes, mesh)


def _ep_implementation(model: nn.Module | None) -> str:
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    return getattr(config, "ep_implementation", None) or "auto"


def _finish_expert_parallel(
    replacement: nn.Module,
    candidate: Candidate,
    sharding: ModuleSharding,
    model: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    placements: dict[str, tuple[Any, ...]],
) -> nn.Module:
    from torch.distributed.tensor import Shard

    from defuser.engine.sharded import hold_experts

    implementation = sharding.closure["implementation"]
    ep_mesh = sharding.closure.get("ep_mesh") or implementation.ep_mesh
    local = replacement.num_experts
    first = ep_mesh.get_local_rank() * local
    hold_experts(replacement, first, local, numbered_locally=True)
    replacement.__dict__["_is_expert_parallel"] = True
    # Fused experts are sharded by expert on the 'ep' mesh first; FSDP composes its own dimension
    # on top when it wraps them (install_expert_parallel does it again after fusing back).
    record = ShardedExperts(
        "expert",
        ep_mesh,
        dict.fromkeys(placements, (Shard(0),)),
        shapes,
        ep_mesh,
        tp_mesh=implementation.tp_mesh,
        ep_implementation=_ep_implementation(model),
        fsdp=_fsdp_settings(model) if sharding.fsdp is not None else None,
    )
    replacement.__dict__["_defuser_sharded"] = record
    install_expert_parallel(replacement, record)
    register_expert_gather(model)
    return replacement


def install_expert_parallel(module: nn.Module, record: ShardedExperts) -> nn.Module:
    """transformers' expert-parallel dispatch on ``module`` (fused or defused experts holding this
    rank's experts), and its FSDP wrapping where the fused experts had one."""
    from transformers.distributed.expert_parallel import EpDispatchExpertsParallel

    EpDispatchExpertsParallel().install_forward(
        module, ep_mesh=record.mesh, tp_mesh=record.tp_mesh, ep_implementation=record.ep_implementation
    )
    if record.fsdp is not None:
        _fully_shard_experts(module, record.fsdp)
    return module


def _fsdp_settings(model: nn.Module) -> dict[str, Any]:
    """How transformers wrapped the fused experts with FSDP (mesh, policies, gradient scaling)."""
    config = model.config.distributed_config
    manager = model._mesh_manager
    if config.dp_replicate_size > 1:
        mesh = manager.get_mesh(("dp_replicate", "efsdp"))
    else:
        mesh = manager.get_mesh("efsdp")
    try:
        from transformers.distributed.fsdp import _get_fsdp_policy_kwargs
    except ImportError as error:  # a release that moved it: refuse rather than guess
        raise DistributedPlanError(f"cannot read transformers' FSDP policy for the experts: {error}") from error
    return {
        "mesh": mesh,
        "policy": _get_fsdp_policy_kwargs(config),
        "divide": float(config.dp_size),
        "force_sum": config.efsdp_size > 1,
    }


def _fully_shard_experts(module: nn.Module, settings: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=settings["mesh"], reshard_after_forward=True, **settings["policy"])
    module.set_gradient_divide_factor(settings["divide"])
    if settings["force_sum"]:
        module.set_force_sum_reduction_for_comms(True)


def register_expert_gather(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write every expert, not only this rank's (once per model)."""
    from defuser.engine.sharded_save import gather_held_experts_on_save

    gather_held_experts_on_save(model)


def _defuse_dense(manager: Any, candidate: Candidate, sharding: ModuleSharding) -> nn.Module:
    """Split a dense MLP whose fused gate-up Linear is ``colwise_gather_output``: the fused weight
    is gathered once, split by the plugin as usual, and each half sharded column-wise again."""
    from defuser.engine.distributed import forward_style
    from defuser.engine.layout import blank_module

    layout: DenseLayout = candidate.layout
    mlp = candidate.module
    fused = mlp._modules[layout.fused_name]
    _, style, closure = forward_style(fused)
    mesh = closure["mesh"]
    full = blank_module(nn.Linear)
    full.__dict__["in_features"], full.__dict__["out_features"] = fused.in_features, fused.out_features
    for name, tensor in fused._parameters.items():
        # Each rank holds whole rows of one half (2 ranks: rank 0 the gate, rank 1 the up), so the
        # halves cannot be re-sharded from the local rows alone: one all-gather, one MLP at a time.
        whole = tensor.full_tensor() if is_dtensor(tensor) else tensor
        full._parameters[name] = None if tensor is None else nn.Parameter(whole.detach(), tensor.requires_grad)
    mlp._modules[layout.fused_name] = full  # the snapshot taken by the caller puts the fused Linear back on failure
    replacement = manager.defuse(candidate)
    for name in ("gate_proj", "up_proj"):
        _shard_columns(replacement._modules[name], mesh)
        _install_style(style, replacement._modules[name], mesh)
    replacement.__dict__["_defuser_sharded_dense"] = (mesh, style)
    return replacement


def _shard_columns(linear: nn.Linear, mesh: Any) -> None:
    """``linear``'s weight and bias as DTensors ``Shard(0)`` over ``mesh``, each rank keeping a
    copy of its rows only (the full tensors are then released)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, tensor in list(linear._parameters.items()):
        if tensor is None:
            continue
        # Every rank holds the full tensor: each takes its rows, no communication.
        sharded = distribute_tensor(tensor.detach(), mesh, [Shard(0)], src_data_rank=None)
        local = sharded.to_local().clone()
        shape = tuple(sharded.shape)
        linear._parameters[name] = nn.Parameter(_as_dtensor(local, mesh, Shard(0), shape), tensor.requires_grad)


def _install_style(style: Any, module: nn.Module, mesh: Any) -> None:
    # Every release's styles take (module, mesh); 5.25 adds keyword-only extras with defaults.
    style.install_forward(module, mesh)


def is_sharded_defused(module: nn.Module) -> bool:
    """True for a defused module that holds sharded experts or halves (see the module docstring)."""
    return isinstance(module.__dict__.get("_defuser_sharded"), ShardedExperts) or (
        "_defuser_sharded_dense" in module.__dict__
    )


def fuse_sharded(module: nn.Module, path: str) -> nn.Module:
    """The fused module a sharded defused module stands for, sharded and wrapped as transformers
    shards and wraps it (see the module docstring).  A dense MLP is joined in place and returned."""
    if "_defuser_sharded_dense" in module.__dict__:
        return _fuse_dense(module, path)
    from defuser.engine.fuse import fuse_experts
    from defuser.engine.sharded import tp_weights_state

    record: ShardedExperts = module.__dict__["_defuser_sharded"]
    sharded = record.kind == "expert" or tp_weights_state(module, record.mesh, path) == "sharded"
    with _local_form(module):
        fused = fuse_experts(module, path)
    if not sharded:  # tensor-parallel style on replicated experts: the fused experts are replicated too
        return fused
    for name, shape in record.shapes.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = fused.get_submodule(owner_path) if owner_path else fused
        local = owner._parameters[leaf]
        placements = record.placements[name]
        stride = torch.empty(shape, device="meta").stride()
        from torch.distributed.tensor import DTensor

        distributed = DTensor.from_local(
            local.detach(),
            record.mesh_for_placements,
            placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=stride,
        )
        owner._parameters[leaf] = nn.Parameter(distributed, requires_grad=local.requires_grad)
    if record.kind == "expert":
        fused.__dict__["num_experts"] = module.num_experts
        fused.__dict__["_is_expert_parallel"] = True
        if record.fsdp is None and _is_fsdp(module):
            # Built defused before load: FSDP wrapped it after the expert-parallel split.
            from defuser.engine.distributed_preload import model_of

            root = model_of(module)
            if root is None:
                raise DistributedPlanError(
                    f"{path}: FSDP-managed experts without their model: cannot wrap the fused form"
                )
            record = dataclasses.replace(record, fsdp=_fsdp_settings(root))
        return install_expert_parallel(fused, record)
    from defuser.engine.distributed_preload import _parallel_registry

    _install_style(_parallel_registry()["moe_tp_experts"], fused, record.mesh)
    return fused


class _local_form:
    """Within the block ``module`` looks like unsharded defused experts numbered from 0: every
    per-expert tensor is its local slice and no full fused shapes are checked."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        from defuser.engine.sharded import expert_parameters

        module = self.module
        self.swapped = []
        for _, linear, name, tensor in list(expert_parameters(module)):
            if is_dtensor(tensor):
                self.swapped.append((linear, name, tensor))
                linear._parameters[name] = nn.Parameter(tensor.to_local().detach(), tensor.requires_grad)
        self.shapes = module.__dict__.get("_fused_tensor_shapes")
        module.__dict__["_fused_tensor_shapes"] = {}
        self.children = module.__dict__["_modules"]
        first = module.__dict__.get("first_expert", 0)
        if first:
            renamed = {}
            for name, child in self.children.items():
                renamed[str(int(name) - first) if name.isdigit() else name] = child
            module.__dict__["_modules"] = renamed
        return module

    def __exit__(self, *exc: object) -> None:
        module = self.module
        module.__dict__["_modules"] = self.children
        if self.shapes is None:
            module.__dict__.pop("_fused_tensor_shapes", None)
        else:
            module.__dict__["_fused_tensor_shapes"] = self.shapes
        for linear, name, tensor in self.swapped:
            linear._parameters[name] = tensor


def _fuse_dense(mlp: nn.Module, path: str) -> nn.Module:
    from defuser.engine.dense import join_dense_mlp
    from defuser.engine.fuse import fuse_dense_mlp

    mesh, style = mlp.__dict__["_defuser_sharded_dense"]
    halves = {name: mlp._modules[name] for name in ("gate_proj", "up_proj")}
    saved = {name: dict(linear._parameters) for name, linear in halves.items()}
    try:
        for linear in halves.values():
            for name, tensor in list(linear._parameters.items()):
                if is_dtensor(tensor):
                    linear._parameters[name] = nn.Parameter(tensor.full_tensor().detach(), tensor.requires_grad)
        fused = fuse_dense_mlp(mlp, path)
    finally:
        for name, linear in halves.items():
            linear.__dict__["_parameters"] = saved[name]
    _shard_columns(fused, mesh)
    _install_style(style, fused, mesh)
    del mlp.__dict__["_defuser_sharded_dense"]
    join_dense_mlp(mlp, fused)
    return mlp
