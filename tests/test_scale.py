"""Conversion work grows with the modules converted, not with the model walked per module:
one walk of the whole model per conversion, whatever the number of layers (issue 14)."""

from __future__ import annotations

import copy

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


# -- Linears built together before load (defuser.engine.layout.empty_linears) ---------------


def _built_before_load(model_type: str, device: str):
    from transformers import AutoModelForCausalLM

    from defuser.tiny import tiny_config

    config = tiny_config(model_type)
    with defuser.defused_blocks(model_type), torch.device(device):
        return AutoModelForCausalLM.from_config(config), config


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_linears_built_together_are_independent_plain_linears(device):
    model, config = _built_before_load("qwen3_moe", device)
    experts = model.model.layers[0].mlp.experts
    layers = [getattr(expert, name) for expert in experts for name in ("gate_proj", "up_proj", "down_proj")]
    assert all(type(layer) is nn.Linear for layer in layers)
    assert all(type(layer.weight) is nn.Parameter and layer.bias is None for layer in layers)
    assert len({id(layer.weight) for layer in layers}) == len(layers)
    assert len({id(layer._parameters) for layer in layers}) == len(layers)
    assert len({id(layer._forward_hooks) for layer in layers}) == len(layers)
    if device == "cpu":  # real storage: one allocation per weight, as nn.Linear makes it
        assert len({layer.weight.data_ptr() for layer in layers}) == len(layers)
    first, second = experts[0].up_proj, experts[1].up_proj
    assert repr(first) == repr(nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False))
    # Changing one leaves the other as it was: flags, hooks (prepend needs OrderedDicts), Parameters.
    first.weight.requires_grad_(False)
    assert second.weight.requires_grad
    first.register_forward_pre_hook(lambda *args: None, prepend=True)
    first.register_forward_hook(lambda *args: None, prepend=True)
    assert not second._forward_pre_hooks and not second._forward_hooks
    first.weight = nn.Parameter(torch.zeros(2, 2, device=device))
    assert second.weight.shape == (config.moe_intermediate_size, config.hidden_size)
    # A quantizer or PEFT replaces a Linear by setattr: only that expert changes.
    replacement = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False, device=device)
    experts[2].gate_proj = replacement
    assert experts[2].gate_proj is replacement and experts[3].gate_proj is not replacement
    state = experts.state_dict()
    assert state["3.down_proj.weight"].shape == (config.hidden_size, config.moe_intermediate_size)
    assert {key for key in state if key.startswith("3.")} == {
        "3.gate_proj.weight",
        "3.up_proj.weight",
        "3.down_proj.weight",
    }


def test_linears_built_together_copy_pickle_and_move():
    import pickle

    model, _ = _built_before_load("qwen3_moe", "cpu")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(3, experts[0].up_proj.in_features)
    expected = experts[1](hidden)
    copied = copy.deepcopy(experts)
    torch.testing.assert_close(copied[1](hidden), expected, rtol=0, atol=0)
    assert copied[1].up_proj.weight is not experts[1].up_proj.weight
    assert copied[1].up_proj.weight.data_ptr() != experts[1].up_proj.weight.data_ptr()
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(experts[1], name)
        unpickled = pickle.loads(pickle.dumps(layer))
        assert type(unpickled) is nn.Linear and set(vars(unpickled)) == set(vars(layer))
        torch.testing.assert_close(unpickled.weight, layer.weight, rtol=0, atol=0)
        unpickled.register_forward_hook(lambda *args: None)
        assert not layer._forward_hooks
    moved = copy.deepcopy(experts).to(torch.float64)
    assert moved[1].down_proj.weight.dtype == torch.float64
    assert experts[1].down_proj.weight.dtype == torch.float32
    empty = _built_before_load("qwen3_moe", "meta")[0].model.layers[0].mlp.experts
    empty.to_empty(device="cpu")
    assert len({expert.up_proj.weight.data_ptr() for expert in empty}) == len(empty)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_linears_built_together_compute_what_the_fused_model_does(model_type):
    stock = build_tiny_model(model_type)
    inputs = tiny_inputs(stock)
    expected = tiny_forward(stock, inputs)
    converted = copy.deepcopy(stock)
    assert defuser.convert_model(converted)
    built, _ = _built_before_load(model_type, "cpu")
    built.load_state_dict(converted.state_dict())
    built.eval()
    torch.testing.assert_close(tiny_forward(built, inputs), expected)


def test_empty_linears_have_their_own_parameters_and_own_allocations_off_meta():
    from defuser.engine.layout import empty_linears

    shape = torch.empty(4, 3, dtype=torch.bfloat16)
    with torch.device("meta"):
        on_meta = empty_linears(5, shape, torch.empty(4))
    assert [layer.weight.shape for layer in on_meta] == [(4, 3)] * 5
    assert all(layer.weight.is_meta and layer.weight.dtype == torch.bfloat16 for layer in on_meta)
    assert len({id(layer.weight) for layer in on_meta}) == len({id(layer.bias) for layer in on_meta}) == 5
    assert all(layer.bias.shape == (4,) and layer.bias.requires_grad for layer in on_meta)
    on_meta[0].weight.data = torch.empty(2, 2, device="meta")
    assert on_meta[1].weight.shape == (4, 3)
    on_cpu = empty_linears(5, shape, None)
    assert len({layer.weight.data_ptr() for layer in on_cpu}) == 5
    assert all(layer.bias is None and (layer.in_features, layer.out_features) == (3, 4) for layer in on_cpu)
    assert empty_linears(0, shape, None) == []


def test_leaving_a_collector_pause_collects_only_the_young_generation():
    import gc

    from defuser.engine.layout import collector_paused

    collections = []

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(record)
    try:
        with collector_paused():
            with collector_paused():  # nested: the inner one leaves the collector paused
                kept = [blank_module(nn.Linear) for _ in range(10)]
            assert not gc.isenabled() and not collections
        # What the pause made is collected at once as a young generation, however little it
        # was (here less than the collector's own threshold): left to the collector, the count a
        # large pause runs up would set off a full pass over the process heap.
        assert gc.isenabled() and collections[:1] == [0]
    finally:
        gc.callbacks.remove(record)
    assert len(kept) == 10
