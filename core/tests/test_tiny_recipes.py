"""Tiny-model recipes are the plugins' knowledge: core's tiny.py keys nothing by model type."""

import ast
import inspect

import pytest

import defuser.tiny as tiny
from defuser.family import Family
from defuser.plugin_info import PluginInfo, TinyModel, TypeSupport
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs, tiny_recipe


def test_core_tiny_names_no_model_type():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    strings = {
        node.value
        for node in ast.walk(ast.parse(inspect.getsource(tiny)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert not strings & set(CONFIG_MAPPING_NAMES)


def test_a_plugin_recipe_shapes_the_tiny_model_and_its_inputs(defuser_plugin_manager):
    defuser_plugin_manager.register(
        Family(
            "recipes",
            [TypeSupport("qwen3_moe")],
            tiny_models={
                "qwen3_moe": TinyModel(config={"num_experts": 4}, inputs="core_recipe_inputs:ones"),
            },
        ),
        "recipes",
    )
    import sys
    import types

    import torch

    module = types.ModuleType("core_recipe_inputs")
    module.ones = lambda model, batch, length, generator: {"input_ids": torch.ones(batch, length + 1, dtype=torch.long)}
    sys.modules["core_recipe_inputs"] = module
    try:
        model = build_tiny_model("qwen3_moe")
        assert model.config.num_experts == 4
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
        inputs = tiny_inputs(model, batch=2, length=3)
        assert inputs["input_ids"].shape == (2, 4) and bool((inputs["input_ids"] == 1).all())
        assert tiny_forward(model, inputs).shape[:2] == (2, 4)
    finally:
        del sys.modules["core_recipe_inputs"]


def test_installed_plugins_give_their_recipes_whatever_plugins_are_active(defuser_plugin_manager):
    # The manager of this test loads no plugin, yet the installed dbrx plugin's recipe applies.
    assert tiny_recipe("dbrx").config["attn_config.clip_qkv"] == 8.0
    assert tiny_recipe("qwen3_omni_moe_talker_text").embeds_only
    assert tiny_recipe("no_such_type") == TinyModel()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TinyModel(inputs="no_colon"), "'module:function'"),
        (lambda: TinyModel(inputs="module:not an identifier"), "'module:function'"),
        (lambda: TinyModel(config={"": 1}), "attribute names"),
        (lambda: PluginInfo("p", tiny_models={"qwen3_moe": {"num_experts": 4}}), "tiny_models['qwen3_moe']"),
    ],
)
def test_a_bad_recipe_is_refused_when_declared(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        make()
