"""GLM conformance: decorated experts and dense fused gate_up MLPs."""

from __future__ import annotations

import torch
from torch import nn

from defuser import convert_model
from defuser_glm.hooks import plugin
from defuser_testkit.checks import model_output
from defuser_testkit.conformance import FamilyConformance
from defuser_testkit.tiny import build_tiny_model, tiny_inputs

CASES = {
    "glm": lambda: build_tiny_model("glm"),
    "glm4": lambda: build_tiny_model("glm4"),
    "glm4_moe": lambda: build_tiny_model("glm4_moe"),
    "glm4_moe_lite": lambda: build_tiny_model("glm4_moe_lite"),
    "glm4v": lambda: build_tiny_model("glm4v"),
    "glm4v_moe": lambda: build_tiny_model("glm4v_moe"),
}


class TestGlm(FamilyConformance):
    cases = CASES
    plugin = plugin  # preload: every case its declaration patches before load
    generate = {"glm", "glm4_moe"}


def test_dense_split_halves_by_meaning():
    model = build_tiny_model("glm4")
    mlp = model.model.layers[0].mlp
    fused = mlp.gate_up_proj.weight.detach().clone()
    half = fused.shape[0] // 2
    assert convert_model(model)
    assert isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear)
    assert torch.equal(mlp.gate_proj.weight, fused[:half])
    assert torch.equal(mlp.up_proj.weight, fused[half:])
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" not in keys


def test_glm4v_preload_splits_dense_text_mlp(tmp_path, defuser_restore_patches):
    from transformers import Glm4vForConditionalGeneration

    from defuser import replace_fused_blocks

    stock = build_tiny_model("glm4v", model_class=Glm4vForConditionalGeneration)
    inputs = tiny_inputs(stock)
    reference = model_output(stock, inputs)
    stock.save_pretrained(tmp_path)
    assert replace_fused_blocks("glm4v") is True
    loaded = Glm4vForConditionalGeneration.from_pretrained(tmp_path).eval()
    mlp = loaded.model.language_model.layers[0].mlp
    assert isinstance(mlp.gate_proj, nn.Linear) and "gate_up_proj" not in mlp._modules
    assert (model_output(loaded, inputs) - reference).abs().max().item() <= 1e-5
