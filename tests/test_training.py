"""Training state across conversion: ``requires_grad`` per projection, and optimizers.

Each per-expert weight keeps the ``requires_grad`` of the fused tensor it comes from (a frozen
``down_proj`` stays frozen while ``gate_up_proj`` trains), for experts, parallel experts and
dense splits, and ``fuse_model`` gives each fused tensor the flag of the weights it joins.

The per-expert weights are new ``nn.Parameter`` objects, so an optimizer created before
``convert_model`` holds the fused parameters only: it never updates the per-expert weights.
With a zero-copy layout those are views of the fused storage, so what is written *into* a
fused parameter shows through them; with a copy layout nothing does.  The practice that
works: create the optimizer after converting; one step then equals the fused model's step.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from defuser import convert_model, fuse_model
from defuser.tiny import build_tiny_model, tiny_inputs

# model type, fused tensors frozen in layer 0, then {per-expert tensor name: requires_grad} of expert 1
GRAD_CASES = {
    "down-frozen": (
        "qwen3_moe",
        ["mlp.experts.down_proj"],
        {"gate_proj.weight": True, "up_proj.weight": True, "down_proj.weight": False},
    ),
    "gate-up-frozen": (
        "qwen3_moe",
        ["mlp.experts.gate_up_proj"],
        {"gate_proj.weight": False, "up_proj.weight": False, "down_proj.weight": True},
    ),
    "copied-with-biases": (
        "gpt_oss",
        ["mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj"],
        {
            "gate_proj.weight": True,
            "gate_proj.bias": False,
            "up_proj.weight": True,
            "up_proj.bias": False,
            "down_proj.weight": False,
            "down_proj.bias": True,
        },
    ),
    "separate-gate-and-up": (
        "dbrx",
        ["ffn.experts.mlp.v1"],
        {"gate_proj.weight": True, "up_proj.weight": False, "down_proj.weight": True},
    ),
}


def _layer0(model: nn.Module) -> nn.Module:
    return model.transformer.blocks[0] if hasattr(model, "transformer") else model.model.layers[0]


def _experts_path(model_type: str) -> str:
    return "ffn.experts" if model_type == "dbrx" else "mlp.experts"


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_requires_grad_is_kept_per_projection_and_back(case):
    model_type, frozen, expected = GRAD_CASES[case]
    model = build_tiny_model(model_type)
    layer = _layer0(model)
    for name in frozen:
        layer.get_parameter(name).requires_grad_(False)
    flags = {name: tensor.requires_grad for name, tensor in layer.named_parameters()}

    assert convert_model(model)

    experts = layer.get_submodule(_experts_path(model_type))
    for index in range(len(experts)):
        got = {name: tensor.requires_grad for name, tensor in experts[index].named_parameters()}
        assert got == expected, (index, got)
    assert fuse_model(model)
    assert {name: tensor.requires_grad for name, tensor in layer.named_parameters()} == flags


def test_requires_grad_of_parallel_experts_and_dense_splits():
    model = build_tiny_model("jetmoe")
    mlp = model.model.layers[0].mlp
    mlp.input_linear.weight.requires_grad_(False)
    assert convert_model(model)
    assert {p.requires_grad for p in mlp.input_linear.parameters()} == {False}
    assert {p.requires_grad for p in mlp.output_linear.parameters()} == {True}
    assert fuse_model(model)
    assert not mlp.input_linear.weight.requires_grad and mlp.output_linear.weight.requires_grad

    model = build_tiny_model("phi3")
    mlp = model.model.layers[0].mlp
    mlp.gate_up_proj.weight.requires_grad_(False)
    assert convert_model(model)
    assert not mlp.gate_proj.weight.requires_grad and not mlp.up_proj.weight.requires_grad
    assert mlp.down_proj.weight.requires_grad
    assert fuse_model(model)
    assert not mlp.gate_up_proj.weight.requires_grad and mlp.down_proj.weight.requires_grad


def test_fuse_model_refuses_to_join_weights_that_differ_in_requires_grad(caplog):
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    defused = model.model.layers[0].mlp.experts
    defused[3].up_proj.weight.requires_grad_(False)  # one expert's up half frozen
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert fuse_model(model)  # layer 1 fuses
    assert "model.layers.0.mlp.experts.gate_up_proj would join tensors that differ in requires_grad" in caplog.text
    assert "model.layers.0.mlp.experts.3.up_proj.weight False" in caplog.text
    assert model.model.layers[0].mlp.experts is defused
    assert not defused[3].up_proj.weight.requires_grad


def _loss(model: nn.Module, inputs) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits.float().square().mean()


def _expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".experts." in name]


@pytest.mark.parametrize("model_type, zero_copy", [("qwen3_moe", True), ("gpt_oss", False)])
def test_an_optimizer_created_before_conversion_keeps_the_fused_parameters(model_type, zero_copy):
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    fused = model.model.layers[0].mlp.experts
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _loss(model, inputs).backward()
    optimizer.step()
    optimizer.zero_grad()
    fused_down = fused.down_proj
    assert fused_down in optimizer.state

    assert convert_model(model)

    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    per_expert = _expert_parameters(model)
    assert per_expert and not any(id(p) in held for p in per_expert), "the optimizer knows none of them"
    assert id(fused_down) in held and fused_down in optimizer.state, "it still holds the fused ones"
    weights = {id(p): p.detach().clone() for p in per_expert}
    _loss(model, inputs).backward()
    assert any(p.grad is not None for p in per_expert) and fused_down.grad is None  # routed experts got grads
    optimizer.step()
    assert all(torch.equal(p, weights[id(p)]) for p in per_expert), "a step changes no per-expert weight"

    # What is written into a fused parameter shows through zero-copy views only.
    with torch.no_grad():
        fused_down.add_(1.0)
    down = model.model.layers[0].mlp.experts[2].down_proj.weight
    assert torch.equal(down, weights[id(down)] + 1.0) is zero_copy
    assert torch.equal(down, weights[id(down)]) is not zero_copy


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_an_optimizer_created_after_conversion_steps_like_the_fused_model(model_type):
    fused = build_tiny_model(model_type)
    inputs = tiny_inputs(fused)
    defused = copy.deepcopy(fused)
    assert convert_model(defused)
    for model in (fused, defused):  # the recommended order: convert, then create the optimizer
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        _loss(model, inputs).backward()
        optimizer.step()
    untrained = _expert_parameters(build_tiny_model(model_type))
    assert all(not torch.equal(p, q) for p, q in zip(_expert_parameters(fused), untrained, strict=True)), "it trained"
    assert fuse_model(defused)
    expected, actual = fused.state_dict(), defused.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_convert_model_and_the_readme_say_to_create_optimizers_after_converting():
    from pathlib import Path

    docstring = " ".join(convert_model.__doc__.split())
    assert "an optimizer created before the conversion still holds the fused parameters" in docstring
    assert "Create optimizers after converting." in docstring
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "**create optimizers after `convert_model`**" in readme
