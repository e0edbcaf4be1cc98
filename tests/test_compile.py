"""torch.compile of defused models: one graph, no break in the experts, outputs equal to eager.

Under compilation the routed experts run as ``defuser::grouped_linear`` custom ops (see
``defuser.engine.compiled``); eager mode keeps calling the expert modules, so hooks fire.
Experts that are not plain ``nn.Linear`` (quantized, wrapped, hooked) fall back to the module
loop after a graph break that names the reason, and stay correct.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from defuser import convert_model
from defuser.engine.compiled import not_plain_reason
from defuser.engine.experts import DefusedExperts, IdentityExpert
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

pytestmark = pytest.mark.slow

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _buildable(model_type: str) -> nn.Module:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers has no {model_type} in this version")
    return build_tiny_model(model_type)


def _defused_experts(model: nn.Module) -> list[DefusedExperts]:
    return [module for module in model.modules() if isinstance(module, DefusedExperts)]


def _forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The main output of ``model`` without a cache: what ``tiny_forward`` runs, minus its
    seeding (a forked RNG cannot be traced; none of the models here samples)."""
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters or hasattr(model.config, "use_cache"):
        kwargs["use_cache"] = False
    output = model(**kwargs)
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def _compiled_forward(model: nn.Module, backend: str, fullgraph: bool = True):
    """:func:`_forward` of ``model``, compiled (a compiled module would not do: ``tiny_forward``
    runs the original inside the compiled wrapper, which has no ``forward`` of its own)."""
    compiled = torch.compile(lambda inputs: _forward(model, inputs), fullgraph=fullgraph, backend=backend)

    def run(inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            return compiled(inputs)

    return run


# (model type, what it covers, backend): inductor for the common families; for the other
# contracts dynamo's graph capture alone (backend "eager"), which is what a break would fail.
FAMILIES = [
    ("qwen3_moe", "concatenated gate-up, zero-copy views", "inductor"),
    ("mixtral", "concatenated gate-up", "inductor"),
    ("gpt_oss", "transposed, interleaved, biased, own gate function", "inductor"),
    ("llama4_text", "expert_major contract", "eager"),
    ("inkling2_text", "weighted_all contract", "eager"),
    ("muse_spark_text", "post-expert norm", "eager"),
    ("step3p7", "own gate function (gate_style='module')", "eager"),
    ("deepseek_v3", "shared experts next to routed ones", "eager"),
]


@pytest.mark.parametrize(("model_type", "covers", "backend"), FAMILIES, ids=[family[0] for family in FAMILIES])
def test_a_defused_model_compiles_in_one_graph_with_equal_outputs(model_type, covers, backend):
    model = _buildable(model_type).eval()
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model)
    experts = _defused_experts(model)
    assert experts, f"{model_type}: nothing defused into DefusedExperts"
    assert all(not_plain_reason(module) is None for module in experts)
    eager = tiny_forward(model, inputs)
    assert (eager - reference).abs().max().item() <= ATOL
    counters.clear()
    compiled = _compiled_forward(model, backend)(inputs)  # fullgraph=True: a break would raise
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=1e-4)


def _routed(experts: DefusedExperts, hidden: int, tokens: int, top_k: int, extra: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs routed to every expert, including indices past the last (identity, sentinel)."""
    generator = torch.Generator().manual_seed(5)
    choices = experts.num_experts + extra
    index = torch.stack([torch.randperm(choices, generator=generator)[:top_k] for _ in range(tokens)])
    return torch.randn(tokens, hidden, generator=generator), index, torch.rand(tokens, top_k, generator=generator)


def test_identity_experts_and_the_sentinel_under_compilation():
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    experts = model.model.layers[0].mlp.experts
    # Two identity ("zero") experts after the last one, and the expert-parallel sentinel past them.
    experts.layout = experts.layout.with_overrides(identity_experts=2)
    for index in range(experts.num_experts, experts.num_experts + 2):  # numbered, as conversion makes them
        experts._modules[str(index)] = IdentityExpert()
    routed = _routed(experts, model.config.hidden_size, tokens=9, top_k=3, extra=3)
    assert (routed[1] >= experts.num_experts + 2).any() and (routed[1] == experts.num_experts).any()
    with torch.no_grad():
        eager = experts(*routed)
        compiled = torch.compile(experts, fullgraph=True, backend="inductor")(*routed)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm], ids=["layer-norm", "rms-norm"])
def test_a_post_expert_norm_under_compilation(norm):
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    experts = model.model.layers[0].mlp.experts
    hidden = model.config.hidden_size
    experts.layout = experts.layout.with_overrides(has_post_expert_norm=True, identity_experts=1)
    experts._modules[str(experts.num_experts)] = IdentityExpert()  # numbered, as conversion makes it
    experts.post_expert_norm = norm(hidden)
    with torch.no_grad():
        experts.post_expert_norm.weight.uniform_(0.5, 1.5)
        if getattr(experts.post_expert_norm, "bias", None) is not None:
            experts.post_expert_norm.bias.uniform_(-1, 1)  # a norm of a zero row is not zero
    routed = _routed(experts, hidden, tokens=9, top_k=3, extra=2)
    with torch.no_grad():
        eager = experts(*routed)
        compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")(*routed)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=1e-4)


def test_hooks_on_expert_linears_fire_in_eager_mode_and_compiled_with_them():
    model = build_tiny_model("qwen3_moe").eval()
    inputs = tiny_inputs(model)
    assert convert_model(model)
    calls: list[str] = []
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: calls.append(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".experts." in name
    ]
    tiny_forward(model, inputs)
    assert calls and all(".experts." in name for name in calls)
    # Compiled with hooks present, the experts run module by module, and the hooks with them.
    experts = model.model.layers[0].mlp.experts
    assert "has hooks" in not_plain_reason(experts)
    routed = _routed(experts, model.config.hidden_size, tokens=6, top_k=2)
    calls.clear()
    with torch.no_grad():
        eager = experts(*routed)
        eager_calls = sorted(calls)
        calls.clear()
        compiled = torch.compile(experts, backend="eager")(*routed)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=1e-4)
    assert sorted(calls) == eager_calls
    for handle in handles:
        handle.remove()
    assert not_plain_reason(experts) is None


class _QuantizedLike(nn.Module):
    """Stands in for a quantizer's layer: not an nn.Linear, no ``weight`` the grouped op could use."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs)


def _linear_subclass(linear: nn.Linear) -> nn.Linear:
    subclass = type("LinearSubclass", (nn.Linear,), {})(linear.in_features, linear.out_features, bias=False)
    subclass.load_state_dict(linear.state_dict())
    return subclass


@pytest.mark.parametrize("replace", [_QuantizedLike, _linear_subclass], ids=["other-module", "linear-subclass"])
def test_projections_that_are_not_plain_linears_fall_back_with_a_named_break(replace):
    model = build_tiny_model("qwen3_moe").eval()
    assert convert_model(model)
    experts = model.model.layers[1].mlp.experts
    experts[3].up_proj = replace(experts[3].up_proj)
    reason = not_plain_reason(experts)
    assert reason is not None and "expert 3.up_proj" in reason
    routed = _routed(experts, model.config.hidden_size, tokens=6, top_k=2)
    with torch.no_grad():
        reference = experts(*routed)
        with pytest.raises(torch._dynamo.exc.Unsupported, match=r"expert 3\.up_proj"):
            torch.compile(experts, fullgraph=True, backend="eager")(*routed)
        torch._dynamo.reset()
        compiled = torch.compile(experts, backend="eager")(*routed)
    torch.testing.assert_close(compiled, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_compiled_training_gives_the_eager_gradients(model_type):
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    assert convert_model(model)

    def gradients(module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        output = module(**inputs, use_cache=False).logits
        output.pow(2).mean().backward()
        # An expert that got no token has no gradient in eager mode, a zero one when compiled.
        grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}
        return output.detach(), grads

    eager_output, eager_grads = gradients(model)
    compiled_output, compiled_grads = gradients(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_output, eager_output, atol=ATOL, rtol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_grouped_linear_op_passes_torch_opcheck():
    generator = torch.Generator().manual_seed(0)
    experts, rows, features = 4, 10, 6
    counts = torch.tensor([3, 0, 5, 1])  # one row of no expert at the end
    inputs = torch.randn(rows, features, generator=generator, requires_grad=True)
    weights = [torch.randn(width, features, generator=generator, requires_grad=True) for width in [5] * experts]
    weights += [torch.randn(7, features, generator=generator, requires_grad=True) for _ in range(experts)]
    biases = [torch.randn(weight.shape[0], generator=generator, requires_grad=True) for weight in weights]
    for with_bias in (biases, []):
        torch.library.opcheck(torch.ops.defuser.grouped_linear, (inputs, counts, weights, with_bias))
    gate, up = torch.ops.defuser.grouped_linear(inputs, counts, weights, biases)
    assert gate.shape == (rows, 5) and up.shape == (rows, 7)
    starts = [0, 3, 3, 8]
    for expert, (start, count) in enumerate(zip(starts, counts.tolist(), strict=True)):
        group = inputs[start : start + count]
        expected = nn.functional.linear(group, weights[experts + expert], biases[experts + expert])
        assert torch.equal(up[start : start + count], expected)
    assert torch.equal(gate[9:], torch.zeros(1, 5)), "rows past the last group are zero"


def test_the_grouped_linear_op_rejects_inconsistent_weights():
    inputs, counts = torch.randn(4, 6), torch.tensor([2, 2])
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        torch.ops.defuser.grouped_linear(inputs, counts, [torch.randn(5, 6)] * 3, [])
    with pytest.raises(ValueError, match="projection 0 are not all"):
        torch.ops.defuser.grouped_linear(inputs, counts, [torch.randn(5, 6), torch.randn(4, 6)], [])
