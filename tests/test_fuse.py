"""``fuse_model``: the inverse of ``convert_model`` (every type's round trip is in the census)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from defuser import convert_model, fuse_model
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5


def _experts(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp.experts


def test_zero_copy_round_trip_gives_back_the_same_storage():
    model = build_tiny_model("qwen3_moe")
    fused = _experts(model, 0)
    pointers = {name: tensor.data_ptr() for name, tensor in fused.named_parameters()}
    assert convert_model(model)
    assert fuse_model(model)
    back = _experts(model, 0)
    assert type(back) is type(fused) and back is not fused
    # Still laid out as the fused tensor: the fused tensor is a view again, nothing copied.
    assert {name: tensor.data_ptr() for name, tensor in back.named_parameters()} == pointers
    assert back.gate_up_proj.is_contiguous() and back.gate_up_proj.shape == fused.gate_up_proj.shape


def test_copy_layout_round_trip_is_exact():
    model = build_tiny_model("gpt_oss")
    original = {name: tensor.clone() for name, tensor in _experts(model, 0).named_parameters()}
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model) and fuse_model(model)
    back = dict(_experts(model, 0).named_parameters())
    assert list(back) == list(original)
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_changed_weights_are_fused_back():
    model = build_tiny_model("mixtral")
    assert convert_model(model)
    expert = _experts(model, 1)[2]
    with torch.no_grad():
        expert.up_proj.weight.add_(1.0)  # an edit made on the defused form (pruning, tuning)
    inputs = tiny_inputs(model)
    edited = tiny_forward(model, inputs)
    assert fuse_model(model)
    experts = _experts(model, 1)
    size = experts.gate_up_proj.shape[1] // 2
    assert torch.equal(experts.gate_up_proj[2, size:], expert.up_proj.weight)
    assert (tiny_forward(model, inputs) - edited).abs().max().item() <= ATOL


class _FakeQuantLinear(nn.Module):
    """Stands for a quantized layer: same call, no plain weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.inner = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden_states)


def test_module_with_a_non_linear_projection_is_left_and_named(caplog):
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    layer0 = _experts(model, 0)
    layer0[3].down_proj = _FakeQuantLinear(layer0[3].down_proj)
    state = {name: tensor for name, tensor in layer0.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert fuse_model(model) is True  # layer 1 is fused
    assert "model.layers.0.mlp.experts.3.down_proj is _FakeQuantLinear" in caplog.text
    assert _experts(model, 0) is layer0
    assert all(torch.equal(layer0.state_dict()[name], tensor) for name, tensor in state.items())
    assert type(_experts(model, 1)).__name__ == "Qwen3MoeExperts"


def test_nothing_fusable_returns_false_and_non_modules_are_refused():
    model = build_tiny_model("qwen3_moe")
    assert fuse_model(model) is False
    with pytest.raises(TypeError, match=r"fuse_model expects a torch\.nn\.Module"):
        fuse_model("model")
    assert convert_model(model)
    with pytest.raises(ValueError, match="invalid filter rule"):
        fuse_model(model, filter=["-:("])


def test_filter_selects_what_is_fused():
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model)
    assert fuse_model(model, filter=[r"-:layers\.1\.", r"\.experts$"])
    assert type(_experts(model, 0)).__name__ == "Qwen3MoeExperts"
    assert type(_experts(model, 1)).__name__ == "DefusedQwen3MoeExperts"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_dense_mlp_gets_its_fused_linear_back_in_place():
    model = build_tiny_model("phi3")
    mlp = model.model.layers[0].mlp
    names = list(mlp._modules)
    weight = mlp.gate_up_proj.weight.clone()
    assert convert_model(model)
    assert "gate_up_proj" not in mlp._modules
    assert fuse_model(model)
    assert list(mlp._modules) == names and type(mlp.gate_up_proj) is nn.Linear
    assert torch.equal(mlp.gate_up_proj.weight, weight)


def test_meta_model_fuses_without_allocating():
    with torch.device("meta"):
        model = build_tiny_model("gpt_oss")
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert convert_model(model) and fuse_model(model)
    after = model.state_dict()
    assert {name: tensor.shape for name, tensor in after.items()} == shapes
    assert all(tensor.device.type == "meta" for tensor in after.values())


def test_model_built_after_replace_fused_blocks_fuses_to_the_stock_class():
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from defuser import replace_fused_blocks
    from defuser.engine.preload import restore_preload_patches

    stock = modeling_qwen3_moe.Qwen3MoeExperts
    assert replace_fused_blocks("qwen3_moe")
    try:
        model = build_tiny_model("qwen3_moe")
    finally:
        restore_preload_patches("qwen3_moe")
    assert type(_experts(model, 0)).__name__ == "DefusedQwen3MoeExperts"
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert fuse_model(model)
    assert type(_experts(model, 0)) is stock
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
