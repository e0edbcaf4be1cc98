"""JetMoE: conformance of every claimed model type on the installed transformers."""

from defuser_jetmoe.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestJetmoe(FamilyConformance):
    cases, unavailable = cases_for(plugin)


def test_mlp_input_is_split_into_gate_and_up_but_attention_experts_are_not():
    import torch
    from torch import nn

    from defuser import convert_model
    from defuser.tiny import build_tiny_model

    model = build_tiny_model("jetmoe")
    layer = model.model.layers[0]
    stacked = layer.mlp.input_linear.weight.detach().clone()
    attention = layer.self_attention.experts.input_linear.weight.detach().clone()
    assert convert_model(model)
    half = stacked.shape[1] // 2
    expert = layer.mlp.input_linear[2]
    assert torch.equal(expert.gate_proj.weight, stacked[2][:half])
    assert torch.equal(expert.up_proj.weight, stacked[2][half:])
    query = layer.self_attention.experts.input_linear[2]
    assert isinstance(query, nn.Linear)
    assert torch.equal(query.weight, attention[2])
