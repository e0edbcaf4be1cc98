"""Meituan LongCat-Flash: conformance of every claimed model type on the installed transformers."""

from defuser_longcat.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestLongcat(FamilyConformance):
    plugin = plugin


def test_identity_experts_pass_tokens_through():
    """Routing indices past the routed experts are identity ("zero") experts."""
    import torch

    from defuser import convert_model
    from defuser_testkit.tiny import build_tiny_model

    model = build_tiny_model("longcat_flash")
    experts = model.model.layers[0].mlp.experts
    if not hasattr(experts, "zero_expert_num"):
        import pytest

        pytest.skip("transformers 5.25.0 moved the identity experts out of LongcatFlashExperts")
    zero = experts.zero_expert_num
    assert zero > 0, "the tiny config should keep identity experts"
    routed = experts.num_routed_experts
    hidden = torch.randn(5, model.config.hidden_size)
    index = torch.tensor([[0, routed], [routed, 1], [routed + zero - 1, 2], [3, 0], [routed, routed + zero - 1]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        assert convert_model(model)
        defused = model.model.layers[0].mlp.experts
        assert len(defused) == routed
        actual = defused(hidden, index, weights)
    assert (actual - expected).abs().max().item() <= 1e-6
    # Every routing index names a numbered module: identity ones hold an ``identity`` marker
    # (ModelCloud's Defuser's name) and no weights.
    for number in range(routed, routed + zero):
        identity = defused.get_submodule(f"{number}.identity")
        assert isinstance(identity, torch.nn.Identity)
        assert defused[number] is defused.get_submodule(str(number))
        assert not list(defused[number].parameters())
    assert not hasattr(defused[0], "identity")
    saved = [key for key in model.state_dict() if ".mlp.experts." in key]
    assert not [key for key in saved if int(key.split(".mlp.experts.")[1].split(".")[0]) >= routed]
