"""Back to fused: rebuild the fused tensors, class and forward from defused modules.

Defusion keeps a *skeleton* of every module it replaces (:mod:`defuser.engine.skeleton`): a
shallow copy of the fused module whose fused tensors are removed.  Fusing fills a fresh copy of
that skeleton with tensors joined from the
per-expert ``nn.Linear`` weights.  When those weights are still views laid out exactly as
the fused tensor (a zero-copy defusion never touched since), the fused tensor is rebuilt as
a view of the same storage; otherwise the experts are copied into one new tensor.

Only plain ``nn.Linear`` projections are joined: a module whose projections were replaced by
anything else (a quantized layer, an adapter) is reported by :class:`NotFusable` and left as
it is.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from defuser.engine.candidates import ExpertsLayout, ParallelLayout
from defuser.engine.dense import split_dense_layout, split_dense_skeleton
from defuser.engine.layout import FusedTensors, join_gate_up, orient, stacked_expert_weights
from defuser.engine.skeleton import skeleton_of

__all__ = [
    "NotFusable",
    "adjacent_or_cat",
    "fuse_dense_mlp",
    "fuse_experts",
    "fuse_parallel",
    "fused_names",
]


class NotFusable(TypeError):
    """A defused module cannot be fused back as it is; the message says which part and why."""


def fused_names(layout: ExpertsLayout) -> list[str]:
    """The (possibly dotted) names of the fused tensors ``layout`` reads (see ``ExpertsLayout.tensors``)."""
    return [tensor.name for tensor in layout.tensors()]


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    *owners, leaf = name.split(".")
    for owner in owners:
        module = module._modules[owner]
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)


def _plain_linear(module: Any, where: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise NotFusable(f"{where} is {type(module).__name__}, not a plain nn.Linear")
    return module


def _stack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weights = torch.stack([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    if any(has_bias) and not all(has_bias):
        raise NotFusable("some experts have a bias and others do not")
    biases = torch.stack([linear.bias.detach() for linear in linears]) if all(has_bias) else None
    return weights, biases


def _same_view(expected: torch.Tensor | None, actual: torch.Tensor | None) -> bool:
    if expected is None or actual is None:
        return expected is actual
    return (
        expected.data_ptr() == actual.data_ptr()
        and expected.shape == actual.shape
        and expected.stride() == actual.stride()
        and expected.dtype == actual.dtype
        and expected.device == actual.device
    )


def _view_of_storage(reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A contiguous tensor of ``shape`` on ``reference``'s storage, starting where ``reference``
    starts, or None where it would run past the end of the storage."""
    start = reference.storage_offset()
    storage = reference.untyped_storage()
    if (start + math.prod(shape)) * reference.element_size() > storage.nbytes():
        return None
    strides = torch.empty(shape, device="meta").stride()
    return torch.empty(0, dtype=reference.dtype, device=reference.device).set_(storage, start, shape, strides)


def _experts_tensors_by_view(
    layout: ExpertsLayout, shapes: dict[str, tuple[int, ...]], experts: list[nn.Module]
) -> dict[str, torch.Tensor] | None:
    """The fused tensors as views of the storage the per-expert weights already share, when
    splitting those views again gives back exactly every expert's weight (None otherwise)."""
    if not layout.zero_copy:
        return None
    first = experts[0]
    # The projection whose expert-0 weight starts the first fused tensor.
    gate_starts = layout.has_gate and (layout.separate_gate_up or layout.gate_first)
    anchor_name = "gate_proj" if gate_starts else "up_proj"
    anchor = getattr(first, anchor_name).weight
    down_anchor = first.down_proj.weight
    if anchor.device.type == "meta":
        return None
    candidates: dict[str, torch.Tensor | None] = {}
    for name in fused_names(layout):
        shape = shapes.get(name)
        if shape is None:
            return None
        if name.endswith("_bias"):
            projection = "down_proj" if name.startswith(layout.down_name) else anchor_name
            bias = getattr(first, projection).bias
            candidates[name] = None if bias is None else _view_of_storage(bias, shape)
        elif name == layout.down_name:
            candidates[name] = _view_of_storage(down_anchor, shape)
        elif layout.separate_gate_up and name == layout.up_name:
            candidates[name] = _view_of_storage(first.up_proj.weight, shape)
        else:
            candidates[name] = _view_of_storage(anchor, shape)
    if any(value is None for value in candidates.values()):
        return None
    tensors = FusedTensors(
        first=candidates[layout.first_name],
        down=candidates[layout.down_name],
        second=candidates.get(layout.up_name) if layout.separate_gate_up else None,
        first_bias=candidates.get(f"{layout.first_name}_bias"),
        down_bias=candidates.get(f"{layout.down_name}_bias"),
    )
    stacked = stacked_expert_weights(tensors, layout)
    for index, expert in enumerate(experts):
        pairs = [(stacked.up[index], expert.up_proj.weight), (stacked.down[index], expert.down_proj.weight)]
        if stacked.gate is not None:
            pairs.append((stacked.gate[index], expert.gate_proj.weight))
        for stack, projection in (
            (stacked.gate_bias, "gate_proj"),
            (stacked.up_bias, "up_proj"),
            (stacked.down_bias, "down_proj"),
        ):
            if stack is not None:
                pairs.append((stack[index], getattr(expert, projection).bias))
        if not all(_same_view(expected, actual) for expected, actual in pairs):
            return None
    return candidates  # type: ignore[return-value]


def _pad_experts(tensor: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Append zero rows for experts the defused form dropped (never-routed identity slots)."""
    if shape is None or tensor.shape[0] >= shape[0]:
        return tensor
    padding = tensor.new_zeros((shape[0] - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat((tensor, padding))


def _experts_tensors_by_copy(
    layout: ExpertsLayout, shapes: dict[str, tuple[int, ...]], experts: list[nn.Module], path: str
) -> dict[str, torch.Tensor]:
    def linears(projection: str) -> list[nn.Linear]:
        return [
            _plain_linear(getattr(expert, projection), f"{path}.{index}.{projection}")
            for index, expert in enumerate(experts)
        ]

    def stored(stack: torch.Tensor, transposed: bool, name: str) -> torch.Tensor:
        tensor = orient(stack, transposed).contiguous()
        if layout.flattened:
            return tensor.reshape(-1, tensor.shape[-1])
        return _pad_experts(tensor, shapes.get(name))

    up, up_bias = _stack(linears("up_proj"))
    down, down_bias = _stack(linears("down_proj"))
    result: dict[str, torch.Tensor] = {layout.down_name: stored(down, layout.transposed_down, layout.down_name)}
    if down_bias is not None:
        result[f"{layout.down_name}_bias"] = _pad_experts(down_bias, shapes.get(f"{layout.down_name}_bias"))
    if not layout.has_gate:
        result[layout.first_name] = stored(up, layout.is_transposed, layout.first_name)
        if up_bias is not None:
            result[f"{layout.first_name}_bias"] = _pad_experts(up_bias, shapes.get(f"{layout.first_name}_bias"))
        return result
    gate, gate_bias = _stack(linears("gate_proj"))
    if layout.separate_gate_up:
        result[layout.gate_name] = stored(gate, layout.is_transposed, layout.gate_name)
        result[layout.up_name] = stored(up, layout.is_transposed, layout.up_name)
        return result
    result[layout.first_name] = stored(join_gate_up(gate, up, layout, dim=-2), layout.is_transposed, layout.first_name)
    if gate_bias is not None and up_bias is not None:
        joined = join_gate_up(gate_bias, up_bias, layout, dim=-1)
        result[f"{layout.first_name}_bias"] = _pad_experts(joined, shapes.get(f"{layout.first_name}_bias"))
    return result


def _check_experts(defused: nn.Module, layout: ExpertsLayout, path: str) -> list[nn.Module]:
    experts = [defused._modules.get(str(index)) for index in range(layout.num_experts)]
    projections = ("gate_proj", "up_proj", "down_proj") if layout.has_gate else ("up_proj", "down_proj")
    for index, expert in enumerate(experts):
        if expert is None:
            raise NotFusable(f"{path}.{index} is missing")
        for projection in projections:
            _plain_linear(getattr(expert, projection, None), f"{path}.{index}.{projection}")
    return experts


def fuse_experts(defused: nn.Module, path: str) -> nn.Module:
    """The fused module a :class:`~defuser.engine.experts.DefusedExperts` came from, rebuilt
    from its current per-expert weights (views of their storage when still laid out as fused)."""
    layout: ExpertsLayout = defused.layout
    skeleton = defused.__dict__.get("_fused_skeleton")
    if skeleton is None:
        raise NotFusable(f"{path} ({type(defused).__name__}) keeps no record of its fused form")
    experts = _check_experts(defused, layout, path)
    shapes = defused.__dict__.get("_fused_tensor_shapes", {})
    tensors = _experts_tensors_by_view(layout, shapes, experts)
    if tensors is None:
        tensors = _experts_tensors_by_copy(layout, shapes, experts, path)
    for name, tensor in tensors.items():
        expected = shapes.get(name)
        if expected is not None and tuple(tensor.shape) != tuple(expected):
            raise NotFusable(f"{path}: rebuilt {name} has shape {tuple(tensor.shape)}, the fused module had {expected}")
    grads = {name: _experts_grad(layout, name, experts, path) for name in tensors}
    fused = skeleton_of(skeleton, [])
    fused.train(defused.training)
    for name, tensor in tensors.items():
        _set_tensor(fused, name, tensor, grads[name])
    return fused


def _shared_grad(parts: list[tuple[str, torch.Tensor]], fused_name: str) -> bool:
    """The ``requires_grad`` every tensor joined into one fused parameter has in common."""
    flags = {tensor.requires_grad for _, tensor in parts}
    if len(flags) > 1:
        frozen = [where for where, tensor in parts if not tensor.requires_grad]
        trained = [where for where, tensor in parts if tensor.requires_grad]
        raise NotFusable(
            f"{fused_name} would join tensors that differ in requires_grad ({frozen[0]} False, {trained[0]} True): "
            "one fused parameter holds one flag"
        )
    return flags.pop() if flags else False


def _experts_grad(layout: ExpertsLayout, name: str, experts: list[nn.Module], path: str) -> bool:
    """``requires_grad`` of the fused tensor ``name``, from the per-expert tensors it joins."""
    # Biases the experts carry though the layout declares none are joined too (see _experts_tensors_by_copy).
    tensor = layout.tensor(name) or replace(layout, has_bias=True).tensor(name)
    if tensor is None:
        raise NotFusable(f"{path}: {name!r} is not a fused tensor of its layout")
    parts = [
        (key, getattr(getattr(expert, projection), tensor.leaf))
        for index, expert in enumerate(experts)
        for projection, key in zip(tensor.projections, tensor.keys(path, index), strict=True)
    ]
    return _shared_grad(parts, f"{path}.{name}")


def fuse_parallel(defused: nn.Module, layout: ParallelLayout, path: str) -> nn.Module:
    """The fused parallel-experts module a ``DefusedParallelExperts`` came from."""
    skeleton = defused.__dict__.get("_fused_skeleton")
    if skeleton is None:
        raise NotFusable(f"{path} ({type(defused).__name__}) keeps no record of its fused form")
    weights = []
    parts: list[tuple[str, torch.Tensor]] = []
    for index, expert in enumerate(defused):
        where = f"{path}.{index}.linear"
        linear = _plain_linear(getattr(expert, "linear", None), where)
        if linear.bias is not None:
            raise NotFusable(f"{where} has a bias; the stacked weight has none")
        parts.append((f"{where}.weight", linear.weight))
        weights.append(linear.weight.detach())
    requires_grad = _shared_grad(parts, f"{path}.{layout.weight_name}")
    stacked = orient(torch.stack(weights), layout.transposed).contiguous()
    fused = skeleton_of(skeleton, [])
    fused.train(defused.training)
    _set_tensor(fused, layout.weight_name, stacked, requires_grad)
    return fused


def fuse_dense_mlp(mlp: nn.Module, path: str) -> nn.Linear:
    """The fused gate-up Linear of a split dense MLP, rebuilt from its ``gate_proj`` and
    ``up_proj`` (install it with :func:`defuser.engine.dense.join_dense_mlp`)."""
    layout, skeleton = split_dense_layout(mlp), split_dense_skeleton(mlp)
    if layout is None or skeleton is None:
        raise NotFusable(f"{path} ({type(mlp).__name__}) keeps no record of its fused gate-up Linear")
    gate = _plain_linear(mlp._modules.get("gate_proj"), f"{path}.gate_proj")
    up = _plain_linear(mlp._modules.get("up_proj"), f"{path}.up_proj")
    if (gate.bias is None) != (up.bias is None):
        raise NotFusable(f"{path}: only one of gate_proj and up_proj has a bias")
    first, second = (gate, up) if layout.gate_first else (up, gate)
    linear = skeleton_of(skeleton, [])
    weight = adjacent_or_cat(first.weight.detach(), second.weight.detach())
    weight_grad = _shared_grad(
        [(f"{path}.gate_proj.weight", gate.weight), (f"{path}.up_proj.weight", up.weight)],
        f"{path}.{layout.fused_name}.weight",
    )
    linear._parameters["weight"] = nn.Parameter(weight, requires_grad=weight_grad)
    if first.bias is not None:
        bias = adjacent_or_cat(first.bias.detach(), second.bias.detach())
        bias_grad = _shared_grad(
            [(f"{path}.gate_proj.bias", gate.bias), (f"{path}.up_proj.bias", up.bias)],
            f"{path}.{layout.fused_name}.bias",
        )
        linear._parameters["bias"] = nn.Parameter(bias, requires_grad=bias_grad)
    linear.train(mlp.training)
    return linear


def adjacent_or_cat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``cat((first, second))`` along dim 0, as a view when ``second`` directly follows ``first``."""
    if first.device.type != "meta" and first.is_contiguous() and second.is_contiguous():
        joined = _view_of_storage(first, (first.shape[0] + second.shape[0], *first.shape[1:]))
        rows = first.shape[0]
        if joined is not None and _same_view(joined[:rows], first) and _same_view(joined[rows:], second):
            return joined
    return torch.cat((first, second))
