"""Conversion work grows with the modules converted, not with the model walked per module:
one walk of the whole model per conversion, whatever the number of layers (issue 14)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defuser
import defuser.api
from defuser.engine.layout import blank_module
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs


def _walks_of(action, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many times ``action(model)`` (which must return True) walks ``model`` from the root:
    defuser's own walk, and ``named_modules``/``modules`` called on the root (by defuser or by
    what it calls)."""
    walks = 0
    stock_named_modules = nn.Module.named_modules
    stock_walk = defuser.api.iter_typed_modules

    def counting_named_modules(self, *args, **kwargs):
        nonlocal walks
        if self is model:
            walks += 1
        return stock_named_modules(self, *args, **kwargs)

    def counting_walk(root, *args, **kwargs):
        nonlocal walks
        if root is model:
            walks += 1
        return stock_walk(root, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(nn.Module, "named_modules", counting_named_modules)
        patched.setattr(defuser.api, "iter_typed_modules", counting_walk)
        assert action(model)
    return walks


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_model_walks_per_conversion_do_not_grow_with_layers(model_type, monkeypatch):
    walks, fuse_walks = {}, {}
    for layers in (2, 6):
        overrides = {"num_hidden_layers": layers}
        if model_type == "deepseek_v3":
            overrides["first_k_dense_replace"] = 1  # a dense layer, then MoE layers
        model = build_tiny_model(model_type, **overrides)
        inputs = tiny_inputs(model)
        expected = tiny_forward(model, inputs)
        walks[layers] = _walks_of(defuser.convert_model, model, monkeypatch)
        torch.testing.assert_close(tiny_forward(model, inputs), expected)
        assert isinstance(model.model.layers[layers - 1].mlp.experts[0].down_proj, nn.Linear)
        fuse_walks[layers] = _walks_of(defuser.fuse_model, model, monkeypatch)
        torch.testing.assert_close(tiny_forward(model, inputs), expected)
        assert not isinstance(model.model.layers[layers - 1].mlp.experts, nn.ModuleList)
    assert walks[2] == walks[6], walks
    assert walks[6] <= 3, walks  # defuser's one walk, plus what transformers' save mapping reads
    assert fuse_walks[2] == fuse_walks[6], fuse_walks


def test_a_module_held_at_two_places_is_replaced_at_both():
    model = build_tiny_model("qwen3_moe", num_hidden_layers=2)
    shared = model.model.layers[0].mlp.experts
    model.model.layers[1].mlp.experts = shared
    assert defuser.convert_model(model)
    first, second = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    assert first is second
    assert first is not shared and isinstance(first[0].up_proj, nn.Linear)


def test_blank_modules_share_no_bookkeeping():
    one, other = blank_module(nn.Linear), blank_module(nn.Linear)
    one.register_forward_hook(lambda *args: None)
    one._parameters["weight"] = nn.Parameter(torch.zeros(1, 1))
    assert not other._forward_hooks and "weight" not in other._parameters
    assert set(vars(one)) == set(vars(nn.Module()))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_experts_built_before_load_are_initialised_by_transformers(model_type):
    from transformers import AutoModelForCausalLM

    from defuser.tiny import tiny_config

    config = tiny_config(model_type)
    with defuser.defused_blocks(model_type):
        model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[config.num_hidden_layers - 1].mlp.experts
    weights = torch.stack([expert.down_proj.weight for expert in experts])
    assert torch.isfinite(weights).all()
    # transformers' initialisation of every nn.Linear: normal(0, initializer_range)
    assert abs(weights.std().item() - config.initializer_range) < config.initializer_range / 4
    assert all(expert.down_proj.weight.requires_grad for expert in experts)
