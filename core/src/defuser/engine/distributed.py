"""What transformers' distributed loading did to a module, and refusing what defuser cannot convert.

transformers shards a model across ranks when ``from_pretrained`` gets ``tp_plan=`` or
``distributed_config=DistributedConfig(tp_size=..., ep_size=..., fsdp_size=...)``:

* tensor parallel (5.24+): parameters named by the plan become DTensors sharded over the ``tp``
  mesh (fused experts: ``gate_up_proj`` ``_StridedShard(1, 2)``, ``down_proj`` ``Shard(2)``) and
  a module named by the plan gets its ``forward`` replaced (``module.forward = tp_forward``) by
  its style (``moe_tp_experts`` all-reduces the experts' partial outputs);
* expert parallel (5.24+): every fused experts tensor is ``Shard(0)`` on the ``ep`` mesh,
  ``num_experts`` becomes the local count, and ``forward`` is replaced (``ep_forward``) by the
  ``ep_dispatch_experts`` style, which routes tokens to the rank holding their expert;
* FSDP (5.24+): ``fully_shard`` turns a module's class into ``FSDP<Name>`` and its parameters
  into DTensors on the ``fsdp`` (experts: ``efsdp``) mesh;
* transformers 5.3 shards parameters as plain local tensors and attaches forward hooks,
  marking the module with ``_hf_tp_plan``.

:func:`sharding_of` reads that state from one module; :func:`refuse_unsupported` raises
:class:`DistributedPlanError` naming the plan and the module for any state that defuser cannot
convert exactly, before anything changes.  The reading relies on transformers' private
structure (closure of the installed forward, ``_hf_tp_plan``), so it lives here alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DistributedPlanError",
    "ModuleSharding",
    "active_plans",
    "dtensor_class",
    "forward_style",
    "is_dtensor",
    "legacy_api",
    "plan_entries",
    "refuse_unsupported",
    "register_support",
    "sharding_of",
    "style_name",
    "wildcard_path",
]

logger = logging.getLogger(__name__)


class DistributedPlanError(RuntimeError):
    """A module sharded by transformers' distributed support that defuser cannot convert exactly;
    the message names the module, the plan and what to do instead.  Nothing was changed."""


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """True for a ``DTensor`` (a parameter wrapping one included)."""
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def wildcard_path(name: str) -> str:
    """``name`` with its numbered parts as ``*`` (``layers.3.mlp`` -> ``layers.*.mlp``), as plans write them."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", re.sub(r"^\d+(?=\.|$)", "*", name))


def _parallel_style_classes() -> tuple[type, ...]:
    """transformers' parallel-style base classes (both API generations), where they exist."""
    found: list[type] = []
    for module_name, class_names in (
        ("transformers.distributed.tensor_parallel", ("TensorParallelLayer",)),
        ("transformers.distributed.expert_parallel", ("ExpertParallelLayer",)),
        ("transformers.integrations.tensor_parallel", ("TensorParallelLayer",)),
    ):
        try:
            module = __import__(module_name, fromlist=list(class_names))
        except ImportError:
            continue
        found += [getattr(module, name) for name in class_names if isinstance(getattr(module, name, None), type)]
    return tuple(dict.fromkeys(found))


def style_name(style: Any) -> str:
    """The plan name a parallel-style object is registered under (its class name when unregistered)."""
    try:
        from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    except ImportError:
        try:
            from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES
        except ImportError:
            return type(style).__name__
    for name in ALL_PARALLEL_STYLES:
        if ALL_PARALLEL_STYLES[name] is style:
            return name
    return type(style).__name__


def forward_style(module: nn.Module) -> tuple[str, Any, dict[str, Any]] | None:
    """``(plan name, style object, closure)`` of the parallel style whose forward replaced
    ``module.forward`` (transformers 5.24+ installs ``module.forward = tp_forward``), or None when
    ``module`` keeps its own forward or another wrapper (accelerate's) replaced it."""
    forward = module.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    cells = getattr(forward, "__closure__", None)
    if code is None or not cells:
        return None
    closure = {}
    for name, cell in zip(code.co_freevars, cells, strict=True):
        try:
            closure[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    style = closure.get("self")
    classes = _parallel_style_classes()
    if style is None or not classes or not isinstance(style, classes):
        return None
    return style_name(style), style, closure


def active_plans(model: nn.Module | None) -> dict[str, dict[str, str]]:
    """The parallel plans transformers applied to ``model`` (``{"tp_plan": ..., "ep_plan": ...}``):
    a plan only counts when its size is above 1 (every model carries its plans all the time)."""
    if model is None or not _model_is_distributed(model):
        return {}
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    plans: dict[str, dict[str, str]] = {}
    if config is not None and hasattr(config, "tp_size") and hasattr(config, "ep_size"):
        for name, size in (("tp_plan", config.tp_size), ("ep_plan", config.ep_size)):
            plan = getattr(model, f"_{name}", None)
            if isinstance(size, int) and size > 1 and isinstance(plan, dict):
                plans[name] = plan
        return plans
    # transformers 5.3: one active plan, the expert-parallel one when enabled.
    expert_parallel = bool(getattr(config, "enable_expert_parallel", False))
    plan = getattr(model, "_ep_plan" if expert_parallel else "_tp_plan", None)
    if isinstance(plan, dict):
        plans["ep_plan" if expert_parallel else "tp_plan"] = plan
    return plans


def plan_entries(model: nn.Module | None, path: str, names: Iterable[str] = ()) -> dict[str, str]:
    """The entries of ``model``'s applied parallel plans (:func:`active_plans`) that name the
    module at ``path`` or one of its tensors ``names`` (``"tp_plan <key>"`` -> style)."""
    names = list(names)
    # A dotted tensor name also names its owner (``gate_up_proj.weight`` -> the ``gate_up_proj`` Linear).
    owners = {name.rpartition(".")[0] for name in names if "." in name}
    wanted = {wildcard_path(path)} | {wildcard_path(f"{path}.{name}") for name in [*names, *owners]}
    # transformers 5.3 also matches with every number replaced, names included.
    loose = {re.sub(r"\d+", "*", key) for key in wanted}
    found: dict[str, str] = {}
    for plan_name, plan in active_plans(model).items():
        for key, style in plan.items():
            if key in wanted or key in loose:
                found[f"{plan_name} {key}"] = style
    return found


def _is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


@dataclass(frozen=True)
class ModuleSharding:
    """How transformers' distributed loading left one module (see the module docstring).

    ``placements`` maps each of its DTensor tensors (dotted names reach into children) to
    ``(mesh dimension names, placements, local shape)``; ``style`` is the plan style whose
    forward wraps it (``child_styles``: those wrapping the children holding its tensors);
    ``fsdp`` names the FSDP-managed module holding it (itself or an ancestor); ``legacy_plan``
    is transformers 5.3's ``_hf_tp_plan`` mark; ``plan`` the applied plan entries naming it or
    its tensors.
    """

    path: str
    class_name: str
    style: str | None = None
    style_object: Any = None
    closure: dict[str, Any] = field(default_factory=dict)
    placements: dict[str, tuple[tuple[str, ...], tuple[Any, ...], tuple[int, ...]]] = field(default_factory=dict)
    child_styles: dict[str, str] = field(default_factory=dict)
    fsdp: str | None = None
    legacy_plan: str | None = None
    plan: dict[str, str] = field(default_factory=dict)
    legacy_api: bool = False

    @property
    def sharded(self) -> bool:
        """True when anything distributed touches this module: a DTensor, an installed style,
        FSDP, or (transformers 5.3, whose shards are plain tensors) an applied plan entry."""
        return bool(
            self.style
            or self.child_styles
            or self.placements
            or self.fsdp
            or self.legacy_plan
            or (self.legacy_api and self.plan)
        )

    def describe(self) -> str:
        """The plan and layout in words, for error messages."""
        parts = []
        if self.style:
            parts.append(f"forward wrapped by the {self.style!r} parallel style")
        for child, style in self.child_styles.items():
            parts.append(f"{child} wrapped by {style!r}")
        if self.legacy_plan:
            parts.append(f"tensor-parallel plan {self.legacy_plan!r} (transformers 5.3 hooks)")
        if self.fsdp is not None:
            parts.append(f"managed by FSDP (fsdp_plan) at {self.fsdp or 'the model root'!r}")
        for name, (dims, placements, local) in self.placements.items():
            shown = ", ".join(str(placement) for placement in placements)
            parts.append(f"{name}: [{shown}] on mesh {dims}, local shape {local}")
        if self.plan:
            parts.append("plan " + ", ".join(f"{key}: {style}" for key, style in self.plan.items()))
        return "; ".join(parts) or "not sharded"


def _model_is_distributed(model: nn.Module | None) -> bool:
    if model is None:
        return False
    if getattr(model, "_device_mesh", None) is not None:
        return True
    tp_size = getattr(model, "_tp_size", None)
    return isinstance(tp_size, int) and tp_size > 1


def sharding_of(
    module: nn.Module, path: str, model: nn.Module | None = None, tensors: Iterable[str] = ()
) -> ModuleSharding:
    """Read how transformers' distributed loading left ``module`` (at ``path`` in ``model``).

    ``tensors`` are the (dotted) names of the tensors defusion reads; every DTensor directly in
    ``module`` is reported too.
    """
    names = list(dict.fromkeys([*tensors, *(name for name, _ in module.named_parameters(recurse=False))]))
    placements = {}
    for name in names:
        tensor = _resolve(module, name)
        if is_dtensor(tensor):
            mesh = tensor.device_mesh
            dims = tuple(mesh.mesh_dim_names or (f"dim{index}" for index in range(mesh.ndim)))
            placements[name] = (dims, tuple(tensor.placements), tuple(tensor.to_local().shape))
    found = forward_style(module)
    child_styles = {}
    for owner in dict.fromkeys(name.rpartition(".")[0] for name in names if "." in name):
        child = _get(module, owner)
        if child is None:
            continue
        child_style = forward_style(child)
        legacy_child = child.__dict__.get("_hf_tp_plan")
        if child_style is not None:
            child_styles[owner] = child_style[0]
        elif isinstance(legacy_child, str):
            child_styles[owner] = f"{legacy_child} (transformers 5.3 hooks)"
    fsdp = None
    if model is not None:
        for prefix in _prefixes(path):
            holder = _get(model, prefix)
            if holder is not None and _is_fsdp_module(holder):
                fsdp = prefix
                break
    elif _is_fsdp_module(module):
        fsdp = path
    legacy = module.__dict__.get("_hf_tp_plan")
    return ModuleSharding(
        path=path,
        class_name=type(module).__name__,
        style=found[0] if found else None,
        style_object=found[1] if found else None,
        closure=found[2] if found else {},
        placements=placements,
        child_styles=child_styles,
        fsdp=fsdp,
        legacy_plan=legacy if isinstance(legacy, str) else None,
        plan=plan_entries(model, path, names),
        legacy_api=legacy_api(),
    )


def legacy_api() -> bool:
    """True for transformers releases before the DTensor plans (5.3: ``integrations`` styles only)."""
    try:
        import transformers.distributed.tensor_parallel  # noqa: F401
    except ImportError:
        return True
    return False


def _prefixes(path: str) -> list[str]:
    """``path`` and each of its ancestors, the model root ("") last."""
    parts = path.split(".") if path else []
    return [".".join(parts[:count]) for count in range(len(parts), -1, -1)]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _resolve(module: nn.Module, name: str) -> Any:
    *owners, leaf = name.split(".")
    for owner in owners:
        child = module._modules.get(owner)
        if child is None:
            return None
        module = child
    return {**module._buffers, **module._parameters}.get(leaf)


# Decides, per kind of candidate, whether a sharded state can be converted; registered by the
# module that converts it (defuser.engine.sharded_convert), so this one stays free of
# conversions.  A kind nothing registered for is refused.
_SUPPORT: dict[str, Callable[[Any, ModuleSharding], str | None]] = {}


def register_support(kind: str, check: Callable[[Any, ModuleSharding], str | None]) -> None:
    """``check(candidate, sharding)`` returns None when ``kind`` candidates in that state can be
    converted, else the reason they cannot."""
    _SUPPORT[kind] = check


_UNSUPPORTED = (
    "defuser cannot keep that sharding exact for this module; call defuser.replace_fused_blocks(model_type) "
    "before from_pretrained instead, so the plan applies to defused blocks"
)


def refuse_unsupported(model: nn.Module, candidates: Iterable[Any]) -> dict[int, ModuleSharding]:
    """The sharding of every sharded candidate (by ``id`` of its module); raises
    :class:`DistributedPlanError` naming the first one defuser cannot convert exactly, before
    any candidate changes."""
    found: dict[int, ModuleSharding] = {}
    for candidate in candidates:
        sharding = sharding_of(candidate.module, candidate.path, model, _tensor_names(candidate))
        if not sharding.sharded:
            continue
        check = _SUPPORT.get(candidate.kind)
        reason = check(candidate, sharding) if check is not None else _UNSUPPORTED
        if reason is not None:
            raise DistributedPlanError(
                f"convert_model cannot defuse {candidate.path} ({candidate.class_name}) of this distributed model: "
                f"{sharding.describe()}. {reason}. Nothing was changed."
            )
        found[id(candidate.module)] = sharding
    return found


def _tensor_names(candidate: Any) -> list[str]:
    from defuser.engine.candidates import DenseLayout, ExpertsLayout, ParallelLayout

    layout = candidate.layout
    if isinstance(layout, (ExpertsLayout, DenseLayout, ParallelLayout)):
        return [tensor.name for tensor in layout.tensors()]
    return []
