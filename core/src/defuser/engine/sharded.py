"""Defused experts on a sharded model: the tensor-parallel forward, expert-parallel slices, memory.

Tensor parallel.  Each rank holds a slice of every expert, sharded the way transformers shards a
dense MLP: ``gate_proj`` and ``up_proj`` column-wise (weight and bias ``Shard(0)``: rows of the
output features), ``down_proj`` row-wise (weight ``Shard(1)``, bias ``Replicate``), every
weight a DTensor over the ``tp`` mesh.  The experts run on the local slices and their output is
summed over the ranks once per experts module, as the fused experts' ``moe_tp_experts`` style
does (per-Linear styles would sum once per expert).  A plan may also name the experts' style on
defused experts whose weights are not sharded (a user plan, or a fused checkpoint loaded
replicated): summing there would count the output once per rank.  So
:func:`install_experts_tp_forward` decides from the weights at every call: all sharded as above
-> local compute and one sum; none sharded -> the experts as they are; anything else -> a clear
error.

Expert parallel.  Each rank holds only its experts (:func:`hold_experts`): its children keep
the names of the full model (``experts.4`` .. ``experts.7`` on rank 1 of 2 with 8 experts), so
state-dict keys mean the same expert everywhere, while ``experts[i]`` and iteration follow the
local numbering transformers' expert-parallel dispatch routes with (``num_experts`` is the local
count; index ``num_experts`` marks a route to another rank, which the per-expert forward skips).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from defuser.engine.distributed import DistributedPlanError, is_dtensor

__all__ = [
    "HeldExperts",
    "expert_parameters",
    "held_class_for",
    "held_defused_class_for",
    "hold_experts",
    "install_experts_tp_forward",
    "local_expert_bytes",
    "local_expert_parameters",
    "tp_placement",
    "tp_weights_state",
]

logger = logging.getLogger(__name__)

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def tp_placement(projection: str, tensor_name: str) -> Any:
    """The placement of a per-expert tensor on the ``tp`` mesh (as transformers' ``colwise``
    and ``rowwise`` styles place a dense MLP's)."""
    from torch.distributed.tensor import Replicate, Shard

    if projection == "down_proj":
        return Replicate() if tensor_name == "bias" else Shard(1)
    return Shard(0)


def expert_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(projection, linear, tensor name, tensor)`` for every tensor of every expert of ``module``."""
    for expert in module:
        for projection in _PROJECTIONS:
            linear = expert._modules.get(projection)
            if linear is None:
                continue
            for tensor_name, tensor in linear._parameters.items():
                if tensor is not None:
                    yield projection, linear, tensor_name, tensor


def tp_weights_state(module: nn.Module, mesh: Any, path: str = "") -> str:
    """``"replicated"`` when no per-expert tensor of ``module`` is a DTensor, ``"sharded"`` when
    every one is placed on ``mesh`` as :func:`tp_placement` says; raises
    :class:`DistributedPlanError` naming the module and the first tensor that is neither."""
    sharded = replicated = 0
    where = path or type(module).__name__
    for projection, _, tensor_name, tensor in expert_parameters(module):
        if not is_dtensor(tensor):
            replicated += 1
            continue
        expected = tp_placement(projection, tensor_name)
        if tensor.device_mesh != mesh or tuple(tensor.placements) != (expected,):
            raise DistributedPlanError(
                f"{where}: {projection}.{tensor_name} is placed {tuple(tensor.placements)} on "
                f"{tensor.device_mesh}, not ({expected},) on the experts' tensor-parallel mesh {mesh}: "
                "defuser cannot run it exactly"
            )
        sharded += 1
    if sharded and replicated:
        raise DistributedPlanError(
            f"{where}: {sharded} per-expert tensors are sharded over the tensor-parallel ranks and {replicated} "
            "are not: defuser cannot run that mixture exactly"
        )
    return "sharded" if sharded else "replicated"


if torch.distributed.is_available():

    class _SumGradients(torch.autograd.Function):
        """Identity forward; the backward sums the gradient over ``group`` (each rank's is partial)."""

        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
            ctx.group = group
            return tensor.view_as(tensor)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            grad = grad.contiguous()
            torch.distributed.all_reduce(grad, group=ctx.group)
            return grad, None

    class _SumOutputs(torch.autograd.Function):
        """All-reduce (sum) forward over ``group``; identity backward."""

        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
            tensor = tensor.contiguous()
            torch.distributed.all_reduce(tensor, group=group)
            return tensor

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad, None


def _needs_grad(tensor: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(tensor, torch.Tensor) and tensor.requires_grad


def _local(value: Any) -> Any:
    return value.to_local() if is_dtensor(value) else value


@contextlib.contextmanager
def local_expert_parameters(module: nn.Module, first_rank: bool, group: Any = None) -> Iterator[None]:
    """Within the block every per-expert tensor of ``module`` is its local slice (a plain tensor,
    gradients still reach the DTensor).  The replicated ``down_proj`` bias is added by the first
    rank only, so the sum over the ranks adds it once (its gradient is summed back to every rank)."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for projection, linear, tensor_name, tensor in list(expert_parameters(module)):
            local = tensor.to_local() if is_dtensor(tensor) else tensor
            if projection == "down_proj" and tensor_name == "bias":
                if _needs_grad(tensor):
                    local = _SumGradients.apply(local, group) * (1.0 if first_rank else 0.0)
                elif not first_rank:
                    local = None
            swapped.append((linear, tensor_name, tensor))
            linear._parameters[tensor_name] = local
        yield
    finally:
        for linear, tensor_name, tensor in swapped:
            linear._parameters[tensor_name] = tensor


_WEIGHT_ARGUMENTS = ("top_k_weights", "routing_weights")


def install_experts_tp_forward(module: nn.Module, mesh: Any, path: str = "") -> nn.Module:
    """Wrap ``module.forward`` (defused experts named by a tensor-parallel experts style) so it
    sums over the ranks exactly what is sharded (see the module docstring)."""
    inner = module.forward
    group = mesh.get_group()

    def defused_experts_tp_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if tp_weights_state(module, mesh, path) == "replicated":
            return inner(hidden_states, *args, **kwargs)
        hidden_states = _local(hidden_states)
        args = [_local(value) for value in args]
        kwargs = {name: _local(value) for name, value in kwargs.items()}
        # Each rank back-propagates through its slice only: the gradients of the shared inputs
        # (hidden states, routing weights) it computes are partial and are summed over the ranks.
        if _needs_grad(hidden_states):
            hidden_states = _SumGradients.apply(hidden_states, group)
        if len(args) >= 2 and _needs_grad(args[1]):
            args[1] = _SumGradients.apply(args[1], group)
        for name in _WEIGHT_ARGUMENTS:
            if _needs_grad(kwargs.get(name)):
                kwargs[name] = _SumGradients.apply(kwargs[name], group)
        with local_expert_parameters(module, mesh.get_local_rank() == 0, group):
            output = inner(hidden_states, *args, **kwargs)
        if _needs_grad(output):
            return _SumOutputs.apply(output, group)
        output = output.contiguous()
        torch.distributed.all_reduce(output, group=group)
        return output

    module.forward = defused_experts_tp_forward
    module.__dict__["_defuser_tp_mesh"] = mesh
    return module


class HeldExperts:
    """Mixed in before a defused experts class whose instance holds only some experts (expert
    parallel): ``experts[i]`` is local expert ``i``, the child named ``first_expert + i``."""

    first_expert: int = 0

    def __iter__(self) -> Iterator[nn.Module]:
        first = self.first_expert
        return (self._modules[str(first + index)] for index in range(self.num_experts))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._modules[str(self.first_expert + i)] for i in range(self.num_experts)[index]]
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"local expert index {index} out of range for {self.num_experts} experts held here")
        return self._modules[str(self.first_expert + index % self.num_experts)]

    @property
    def expert_ids(self) -> range:
        """The model's numbers of the experts held here."""
        return range(self.first_expert, self.first_expert + self.num_experts)

    def extra_repr(self) -> str:
        held = f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} held here"
        return f"{super().extra_repr()}, {held}"

    @classmethod
    def class_factory(cls) -> Any:
        """What makes this class again when a pickled instance loads (see
        ``DefusedExperts.class_factory``): the held form of the defused class."""
        return held_defused_class_for


_HELD_CLASSES: dict[type, type] = {}


def held_class_for(cls: type) -> type:
    """The class of a ``cls`` instance that holds only some experts (one per class)."""
    if issubclass(cls, HeldExperts):
        return cls
    held = _HELD_CLASSES.get(cls)
    if held is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        held = type(cls.__name__, (HeldExperts, cls), namespace)
        _HELD_CLASSES[cls] = held
    return held


def held_defused_class_for(fused_class: type[nn.Module], **layout_overrides: Any) -> type:
    """:func:`held_class_for` the defused class of ``fused_class`` (a pickled held module loads as it)."""
    from defuser.engine.experts import defused_class_for

    return held_class_for(defused_class_for(fused_class, **layout_overrides))


def hold_experts(module: nn.Module, first: int, count: int, numbered_locally: bool = False) -> nn.Module:
    """Make ``module`` (defused experts) hold only experts ``first .. first+count-1`` under their
    model-wide names; ``num_experts`` becomes ``count``.  A module holding every expert
    (children ``0 .. E-1``) drops the others; with ``numbered_locally`` its ``count`` children
    ``0 .. count-1`` are those experts and are renamed."""
    if not isinstance(module, HeldExperts):
        module.__class__ = held_class_for(type(module))
        module.__dict__["first_expert"] = 0
    offset = first if numbered_locally else 0
    kept = {}
    for name, child in module._modules.items():
        if not name.isdigit():
            kept[name] = child
        elif first <= int(name) + offset < first + count:
            kept[str(int(name) + offset)] = child
    missing = [number for number in range(first, first + count) if str(number) not in kept]
    if missing:
        raise DistributedPlanError(
            f"{type(module).__name__}: experts {missing} to hold here are not among its experts "
            f"({module.num_experts} from {module.__dict__.get('first_expert', 0)})"
        )
    module.__dict__["_modules"] = kept
    module.__dict__["first_expert"] = first
    module.num_experts = count
    layout = getattr(module, "layout", None)
    if layout is not None and getattr(layout, "num_experts", count) != count:
        from dataclasses import replace

        module.layout = replace(layout, num_experts=count)
    return module


def local_expert_bytes(model: nn.Module) -> int:
    """Bytes of this rank's per-expert tensors of every defused experts module of ``model`` (each
    storage counted once; a DTensor counts its local slice)."""
    from defuser.engine.experts import DefusedExperts

    storages: dict[int, int] = {}
    for module in model.modules():
        if not isinstance(module, DefusedExperts):
            continue
        for _, _, _, tensor in expert_parameters(module):
            local = _local(tensor)
            if local.device.type == "meta":
                continue
            storage = local.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
