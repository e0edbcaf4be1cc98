"""The example plugin's own tests, as a plugin author writes them: defuser-testkit's
conformance suite over the plugin's model types, plus what is particular to the plugin.

defuser's ``tests/test_third_party.py`` runs this file in a subprocess after installing the
distribution; in defuser's own test run, without the distribution installed, it is skipped.
"""

from __future__ import annotations

import pytest

pytest.importorskip("defuser_example", reason="defuser-example-plugin is not installed (tests/test_third_party.py)")

import defuser_example.modeling  # registers toy_moe with transformers' Auto classes
import torch
from defuser_example.hooks import plugin
from torch import nn

from defuser import convert_model
from defuser.plugin import DefusedExperts
from defuser_testkit.conformance import FamilyConformance, cases_for
from defuser_testkit.tiny import build_tiny_model

CASES, UNAVAILABLE = cases_for(plugin)


class TestToyMoe(FamilyConformance):
    cases = CASES
    unavailable = UNAVAILABLE


def test_every_declared_type_is_tested():
    assert set(CASES) == {"toy_moe"} and not UNAVAILABLE


def test_the_plugin_is_what_teaches_defuser_the_layout(defuser_plugin_manager):
    # The testkit's manager has autoload off: without the plugin, nothing is recognised.
    model = build_tiny_model("toy_moe")
    assert isinstance(model, defuser_example.modeling.ToyMoeForCausalLM)
    assert convert_model(model) is False
    defuser_plugin_manager.register(plugin, "example")
    fused = model.model.layers[0].experts
    assert convert_model(model) is True
    experts = model.model.layers[0].experts
    assert isinstance(experts, DefusedExperts) and len(experts) == 8
    # Expert 3's gate is the second half of its input-major w_in slice, transposed.
    half = fused.w_in.shape[-1] // 2
    assert isinstance(experts[3].gate_proj, nn.Linear)
    assert torch.equal(experts[3].gate_proj.weight, fused.w_in[3][:, half:].T)
    assert torch.equal(experts[3].up_proj.weight, fused.w_in[3][:, :half].T)
    assert torch.equal(experts[3].down_proj.weight, fused.w_out[3].T)
