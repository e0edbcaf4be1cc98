"""Meta Llama 4: conformance of every claimed model type on the installed transformers."""

from defuser_llama4.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestLlama4(FamilyConformance):
    plugin = plugin


def test_experts_are_transposed_slices_and_take_expert_major_input():
    import torch

    from defuser import convert_model
    from defuser_testkit.tiny import build_tiny_model

    model = build_tiny_model("llama4_text")
    fused = model.model.layers[0].feed_forward.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    tokens = torch.randn(fused.num_experts * 3, fused.hidden_size)
    with torch.no_grad():
        expected = fused(tokens)
    assert convert_model(model)
    defused = model.model.layers[0].feed_forward.experts
    half = gate_up.shape[-1] // 2
    assert torch.equal(defused[1].gate_proj.weight, gate_up[1][:, :half].T)
    assert torch.equal(defused[1].up_proj.weight, gate_up[1][:, half:].T)
    assert torch.equal(defused[1].down_proj.weight, down[1].T)
    with torch.no_grad():
        assert (defused(tokens) - expected).abs().max().item() <= 1e-5
