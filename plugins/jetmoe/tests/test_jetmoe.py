"""JetMoE: conformance of every claimed model type on the installed transformers."""

from defuser_jetmoe.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestJetmoe(FamilyConformance):
    plugin = plugin


def test_parallel_experts_hold_one_linear_each_under_defusers_names():
    """``input_linear.N.linear`` / ``output_linear.N.linear`` (ModelCloud's Defuser's names, which
    GPTQModel's definitions use): the MLP's GLU input keeps its gate and up rows in one Linear
    (the parent splits the output), the attention experts' projections are plain."""
    import torch
    from torch import nn

    from defuser import convert_model
    from defuser_testkit.tiny import build_tiny_model

    model = build_tiny_model("jetmoe")
    layer = model.model.layers[0]
    places = {
        "mlp.input_linear": layer.mlp.input_linear,
        "mlp.output_linear": layer.mlp.output_linear,
        "self_attention.experts.input_linear": layer.self_attention.experts.input_linear,
        "self_attention.experts.output_linear": layer.self_attention.experts.output_linear,
    }
    stacked = {place: module.weight.detach().clone() for place, module in places.items()}
    assert convert_model(model)
    for place, weight in stacked.items():
        defused = layer.get_submodule(place)
        assert not hasattr(defused, "weight")
        for index in range(weight.shape[0]):
            linear = layer.get_submodule(f"{place}.{index}.linear")
            assert type(linear) is nn.Linear
            assert torch.equal(linear.weight, weight[index])
