"""OpenAI: conformance of every claimed model type on the installed transformers."""

from defuser_gpt_oss.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestGptOss(FamilyConformance):
    plugin = plugin


def test_gate_and_up_are_the_interleaved_columns():
    """gpt-oss alternates gate and up columns of the transposed gate_up_proj [E, H, 2I]."""
    import torch

    from defuser import convert_model
    from defuser_testkit.tiny import build_tiny_model

    model = build_tiny_model("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    gate_up, bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    down = fused.down_proj.detach().clone()
    assert convert_model(model)
    expert = model.model.layers[0].mlp.experts[1]
    assert torch.equal(expert.gate_proj.weight, gate_up[1][:, 0::2].T)
    assert torch.equal(expert.up_proj.weight, gate_up[1][:, 1::2].T)
    assert torch.equal(expert.gate_proj.bias, bias[1][0::2])
    assert torch.equal(expert.up_proj.bias, bias[1][1::2])
    assert torch.equal(expert.down_proj.weight, down[1].T)
