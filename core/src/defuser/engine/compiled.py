"""The routed experts forward under ``torch.compile``: the grouped dispatch as custom ops.

In eager mode :func:`~defuser.engine.experts.per_expert_forward` calls each expert's
``nn.Linear`` modules on its group of tokens, reading the group sizes on the host; the
compiler cannot follow that (a host read and a loop whose trip count depends on the data:
two graph breaks per layer).  While compiling, :func:`grouped_experts_forward` keeps the
routing, the activation, identity experts, the post-expert norm and the weighted combine in
the graph and runs the per-expert matmuls inside ``defuser::grouped_linear``, a custom op
that takes every expert's weights as a tensor list and reads the group sizes inside, where
the compiler does not look.  Each expert's rows go through the same ``F.linear`` as in
eager mode; the activation and norm are row-wise, so applying them to all sorted rows at
once gives the same rows.  The op has a fake (meta) implementation for tracing and an
autograd formula (itself a custom op), so compiled training works too.

Only plain experts take this path: every projection exactly ``nn.Linear`` holding plain
``nn.Parameter`` tensors, without hooks or an instance ``forward``, and one activation shared
by all experts.  Anything else (quantized or LoRA-wrapped projections, accelerate offload
hooks, forward hooks) is run module by module as in eager mode, after an explicit graph break
naming the reason, so it stays correct (``fullgraph=True`` then fails with that reason).
Hooks on the expert Linears therefore fire in eager mode and whenever they exist at compile
time; a compiled graph does not see hooks added after it was compiled (torch's own rule).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["grouped_experts_forward", "grouped_linear", "not_plain_reason"]

logger = logging.getLogger(__name__)

_OP = "defuser::grouped_linear"
_BACKWARD_OP = "defuser::grouped_linear_backward"


def _check_arguments(inputs: torch.Tensor, counts: torch.Tensor, weights: Sequence[torch.Tensor]) -> int:
    """The number of projections per expert; raises for inconsistent arguments."""
    experts = counts.shape[0]
    if counts.ndim != 1 or experts == 0 or len(weights) % experts:
        raise ValueError(f"{_OP}: {len(weights)} weights for {experts} experts (a whole number per expert expected)")
    if inputs.ndim != 2:
        raise ValueError(f"{_OP}: inputs must be [rows, features], got shape {tuple(inputs.shape)}")
    projections = len(weights) // experts
    for projection in range(projections):
        shape = (weights[projection * experts].shape[0], inputs.shape[1])
        if any(tuple(weights[projection * experts + e].shape) != shape for e in range(experts)):
            raise ValueError(f"{_OP}: the weights of projection {projection} are not all {list(shape)}")
    return projections


def _grouped_linear(
    inputs: torch.Tensor, counts: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``defuser::grouped_linear``: ``inputs`` rows sorted by expert, ``counts[e]`` rows for expert
    e; ``weights`` holds P projections of E experts (``weights[p * E + e]``, ``[out_p, in]``),
    ``biases`` the same or nothing.  Returns P tensors ``[rows, out_p]``: each row through its
    expert's projection p; rows past the last group are zero."""
    projections = _check_arguments(inputs, counts, weights)
    experts = counts.shape[0]
    rows = inputs.shape[0]
    outputs = [inputs.new_empty((rows, weights[p * experts].shape[0])) for p in range(projections)]
    start = 0
    # One host read of all group sizes per call.  Each group's product is written straight
    # into its rows of the output by the kernel F.linear would use (mm, or addmm with a bias).
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        end = start + count
        group = inputs[start:end]
        for projection, output in enumerate(outputs):
            index = projection * experts + expert
            weight = weights[index].t()
            if biases:
                torch.addmm(biases[index], group, weight, out=output[start:end])
            else:
                torch.mm(group, weight, out=output[start:end])
        start = end
    for output in outputs:  # rows of no expert (identity experts, the expert-parallel sentinel)
        output[start:].zero_()
    return outputs


def _grouped_linear_fake(
    inputs: torch.Tensor, counts: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    projections = _check_arguments(inputs, counts, weights)
    experts = counts.shape[0]
    return [inputs.new_empty((inputs.shape[0], weights[p * experts].shape[0])) for p in range(projections)]


def _grouped_linear_backward(
    grad_outputs: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    counts: torch.Tensor,
    weights: Sequence[torch.Tensor],
    with_bias: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    _check_arguments(inputs, counts, weights)
    experts = counts.shape[0]
    grad_inputs = torch.zeros_like(inputs)
    grad_weights = [torch.zeros_like(weight) for weight in weights]
    grad_biases = [weight.new_zeros(weight.shape[0]) for weight in weights] if with_bias else []
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        end = start + count
        group = inputs[start:end]
        for projection, grad_output in enumerate(grad_outputs):
            index = projection * experts + expert
            grad = grad_output[start:end]
            grad_inputs[start:end] += grad @ weights[index]
            grad_weights[index] = grad.t() @ group
            if with_bias:
                grad_biases[index] = grad.sum(dim=0)
        start = end
    return grad_inputs, grad_weights, grad_biases


def _grouped_linear_backward_fake(
    grad_outputs: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    counts: torch.Tensor,
    weights: Sequence[torch.Tensor],
    with_bias: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    biases = [weight.new_empty(weight.shape[0]) for weight in weights] if with_bias else []
    return torch.empty_like(inputs), [torch.empty_like(weight) for weight in weights], biases


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    rows, counts, weights, biases = inputs
    ctx.save_for_backward(rows, counts, *weights)
    ctx.with_bias = bool(biases)


def _backward(ctx: Any, grad_outputs: list[torch.Tensor]) -> tuple[Any, ...]:
    rows, counts, *weights = ctx.saved_tensors
    grads = [grad.contiguous() for grad in grad_outputs]
    grad_inputs, grad_weights, grad_biases = torch.ops.defuser.grouped_linear_backward(
        grads, rows, counts, weights, ctx.with_bias
    )
    return grad_inputs, None, grad_weights, grad_biases


grouped_linear = torch.library.custom_op(
    _OP,
    _grouped_linear,
    mutates_args=(),
    schema="(Tensor inputs, Tensor counts, Tensor[] weights, Tensor[] biases) -> Tensor[]",
)
torch.library.register_fake(_OP, _grouped_linear_fake)
torch.library.custom_op(
    _BACKWARD_OP,
    _grouped_linear_backward,
    mutates_args=(),
    schema="(Tensor[] grad_outputs, Tensor inputs, Tensor counts, Tensor[] weights, bool with_bias) "
    "-> (Tensor, Tensor[], Tensor[])",
)
torch.library.register_fake(_BACKWARD_OP, _grouped_linear_backward_fake)
torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


# -- which experts may take the grouped path ---------------------------------------------


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_globals

    return bool(
        module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
    )


def _plain_linear_reason(linear: Any, where: str) -> str | None:
    if type(linear) is not nn.Linear:
        return f"{where} is a {type(linear).__name__}, not a plain nn.Linear"
    if "forward" in linear.__dict__ or "_hf_hook" in linear.__dict__:
        return f"{where} has a wrapped forward (accelerate hook or other wrapper)"
    if _hooked(linear):
        return f"{where} has hooks"
    for name, tensor in (("weight", linear.weight), ("bias", linear.bias)):
        if tensor is not None and type(tensor) is not nn.Parameter:
            return f"{where}.{name} is a {type(tensor).__name__}, not a plain nn.Parameter"
    return None


@dataclass
class _Plan:
    """The tensor lists of the two grouped stages of plain experts."""

    first_weights: list[torch.Tensor]  # every gate_proj, then every up_proj (or every up_proj)
    first_biases: list[torch.Tensor]
    down_weights: list[torch.Tensor]
    down_biases: list[torch.Tensor]
    activation: Any


def _stage(linears: list[nn.Linear], name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]] | str:
    """The weights and biases of one projection of every expert, or why they cannot be grouped."""
    shape = linears[0].weight.shape
    if any(linear.weight.shape != shape for linear in linears):
        return f"the experts' {name} differ in shape"
    biases = [linear.bias for linear in linears if linear.bias is not None]
    if biases and len(biases) != len(linears):
        return f"only some experts' {name} have a bias"
    return [linear.weight for linear in linears], biases


def _plan(module: nn.Module) -> _Plan | str:
    """The grouped form of defused ``module``'s experts, or why they are not plain."""
    from defuser.engine.experts import ExpertMLP

    if _global_hooks():
        return "global module hooks are registered"
    if _hooked(module):
        return "the experts module has hooks"
    experts = [module._modules.get(str(index)) for index in range(module.num_experts)]
    for index, expert in enumerate(experts):
        where = f"expert {index}"
        if type(expert) is not ExpertMLP:
            return f"{where} is a {type(expert).__name__}, not an ExpertMLP"
        if "forward" in expert.__dict__ or _hooked(expert):
            return f"{where} has hooks or a wrapped forward"
        if expert.act_fn is not experts[0].act_fn or expert.is_gated != experts[0].is_gated:
            return f"{where} has another activation than expert 0"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if name in expert._modules:
                reason = _plain_linear_reason(expert._modules[name], f"{where}.{name}")
                if reason is not None:
                    return reason
    names = ("gate_proj", "up_proj") if experts[0].is_gated else ("up_proj",)
    stages = [_stage([expert._modules[name] for expert in experts], name) for name in (*names, "down_proj")]
    reason = next((stage for stage in stages if isinstance(stage, str)), None)
    if reason is not None:
        return reason
    *first, down = stages
    return _Plan(
        first_weights=[weight for weights, _ in first for weight in weights],
        first_biases=[bias for _, biases in first for bias in biases],
        down_weights=down[0],
        down_biases=down[1],
        activation=experts[0].act_fn,
    )


def not_plain_reason(module: nn.Module) -> str | None:
    """Why the experts of defused ``module`` cannot run as grouped custom ops (None: they can)."""
    plan = _plan(module)
    return plan if isinstance(plan, str) else None


def grouped_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor | None:
    """The routed forward of defused ``module`` as a graph without host reads (for
    ``torch.compile``), or None when its experts are not plain (see the module docstring);
    the caller then runs them one by one."""
    from defuser.engine.experts import combine_in_expert_order

    plan = _plan(module)
    if isinstance(plan, str):
        torch._dynamo.graph_break(msg=f"defuser: {type(module).__name__} runs its experts one by one: {plan}")
        return None
    shape = hidden_states.shape
    hidden = hidden_states.reshape(-1, shape[-1])
    top_k = top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    experts = module.num_experts
    routed = experts + module.layout.identity_experts
    # A histogram of fixed size (bincount's size depends on the data): indices past the
    # routed experts (the expert-parallel sentinel) fall into one extra bin, sorted last.
    bins = flat_index.clamp(max=routed)
    counts = torch.zeros(routed + 1, dtype=torch.long, device=flat_index.device)
    counts = counts.scatter_add(0, bins, torch.ones_like(bins))[:experts]
    sorted_inputs = hidden.index_select(0, order // top_k)
    first = torch.ops.defuser.grouped_linear(sorted_inputs, counts, plan.first_weights, plan.first_biases)
    activated = plan.activation(*first)  # (gate, up) or (up,)
    (outputs,) = torch.ops.defuser.grouped_linear(activated, counts, plan.down_weights, plan.down_biases)
    if module.layout.identity_experts or module.layout.has_post_expert_norm:
        sorted_index = flat_index.index_select(0, order).unsqueeze(-1)
        if module.layout.identity_experts:  # an identity ("zero") expert passes its input through
            passes = (sorted_index >= experts) & (sorted_index < routed)
            outputs = torch.where(passes, sorted_inputs.to(outputs.dtype), outputs)
        if module.layout.has_post_expert_norm:
            # Rows of no expert (the sentinel) stay zero, as in eager mode.
            outputs = torch.where(sorted_index < routed, module.post_expert_norm(outputs), 0)
    return combine_in_expert_order(outputs, order, top_k_index, top_k_weights, hidden_states.dtype).reshape(shape)
