"""Qwen conformance: every claimed model type, thinker and talker of Qwen3-Omni-MoE included."""

from __future__ import annotations

import importlib

import pytest
from torch import nn

from defuser import convert_model
from defuser.plugin import DefusedExperts
from defuser_qwen.hooks import plugin
from defuser_testkit.conformance import FamilyConformance
from defuser_testkit.tiny import build_tiny_model, tiny_config


def _omni_part(part: str):
    """Build the thinker or talker text model of Qwen3-Omni-MoE from its tiny sub-config."""

    def build() -> nn.Module:
        module = importlib.import_module("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
        config = tiny_config("qwen3_omni_moe")
        if part == "thinker":
            return build_tiny_model_from(module.Qwen3OmniMoeThinkerTextModel, config.thinker_config.text_config)
        text_config = config.talker_config.text_config
        # The shipped default talker config lacks this attribute (its model reads it).
        text_config.shared_expert_intermediate_size = 16
        return build_tiny_model_from(module.Qwen3OmniMoeTalkerModel, text_config)

    return build


def build_tiny_model_from(cls: type[nn.Module], config) -> nn.Module:
    import torch

    torch.manual_seed(0)
    model = cls(config).eval()
    # Sub-models built directly may skip weight init; give every tensor seeded values.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    return model


CASES = {
    "qwen2_moe": lambda: build_tiny_model("qwen2_moe"),
    "qwen3_moe": lambda: build_tiny_model("qwen3_moe"),
    "qwen3_next": lambda: build_tiny_model("qwen3_next"),
    "qwen3_5_moe": lambda: build_tiny_model("qwen3_5_moe"),
    "qwen3_5_moe_text": lambda: build_tiny_model("qwen3_5_moe_text"),
    "qwen3_vl_moe": lambda: build_tiny_model("qwen3_vl_moe"),
    "qwen3_vl_moe_text": lambda: build_tiny_model("qwen3_vl_moe_text"),
    "qwen3_omni_moe_thinker_text": _omni_part("thinker"),
    "qwen3_omni_moe_talker_text": _omni_part("talker"),
}


class TestQwen(FamilyConformance):
    cases = CASES
    plugin = plugin  # preload: every case its declaration patches before load
    generate = {"qwen2_moe", "qwen3_moe", "qwen3_next"}

    def inputs(self, model_type):
        inputs = super().inputs(model_type)
        if model_type.startswith("qwen3_omni_moe"):
            inputs = {"inputs_embeds": self.cases[model_type]().get_input_embeddings()(inputs["input_ids"]).detach()}
        return inputs


def test_shared_expert_kept_beside_defused_experts():
    model = build_tiny_model("qwen2_moe")
    assert convert_model(model)
    block = model.model.layers[0].mlp
    assert isinstance(block.experts, DefusedExperts)
    assert isinstance(block.shared_expert.gate_proj, nn.Linear)
    assert isinstance(block.shared_expert_gate, nn.Linear)


@pytest.mark.parametrize("part", ["thinker", "talker"])
def test_omni_preload_builds_defused_thinker_and_talker(part, defuser_restore_patches):
    from defuser import replace_fused_blocks

    assert replace_fused_blocks("qwen3_omni_moe") is True
    model = _omni_part(part)()
    experts = [m for m in model.modules() if isinstance(m, DefusedExperts)]
    assert experts, f"{part}: no defused experts after replace_fused_blocks"
    assert all(len(e) == 8 for e in experts)


def test_defused_experts_take_routing_by_keyword_in_any_order():
    import torch

    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(4, model.config.hidden_size)
    index, weights = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]), torch.rand(4, 2)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        assert torch.equal(experts(hidden, top_k_weights=weights, top_k_index=index), expected)
        with pytest.raises(TypeError, match="expects hidden_states"):
            experts(hidden, index, weights, extra=1)
