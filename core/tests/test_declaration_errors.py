"""Every declaration mistake of a plugin author is an error naming plugin, class and field, at
plugin load or when a module of the class is first detected: unknown or mistyped fields and
impossible combinations (``Family(...)`` raises), tensor and activation names the class lacks
(``convert_model`` refuses, changing nothing), misspelt or unmarked hook methods (the plugin
fails to load), ranges read from the distribution before import; ``defuser plugins`` shows
hooks and tested releases, also as JSON."""

import dataclasses
import json
import logging
import sys
import textwrap

import pytest
import torch
from torch import nn

import defuser.plugins as plugins
from defuser import PluginInfo, TypeSupport, convert_model, hookimpl
from defuser.api import ConversionError
from defuser.engine.candidates import ExpertsLayout, declared_experts_layout
from defuser.family import Family
from defuser.plugins import DefuserPluginManager, PluginError

E, H, I = 3, 8, 4  # noqa: E741 - experts, hidden, intermediate


class RoutedExperts(nn.Module):
    """Undecorated experts with transformers' routed forward: gate_up ``[E, 2I, H]``,
    down ``[E, H, I]``, optional biases."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * I))
            self.down_proj_bias = nn.Parameter(torch.randn(E, H))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                gate_up = self.gate_up_proj[e] @ hidden_states[t]
                if hasattr(self, "gate_up_proj_bias"):
                    gate_up = gate_up + self.gate_up_proj_bias[e]
                gate, up = gate_up.chunk(2)
                down = self.down_proj[e] @ (self.act_fn(gate) * up)
                if hasattr(self, "down_proj_bias"):
                    down = down + self.down_proj_bias[e]
                out[t] += down * top_k_weights[t, k]
        return out


class SeparateBiased(nn.Module):
    """Separate gate and up tensors ``[E, I, H]``, each with a bias ``[E, I]``."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(E, I, H))
        self.up_proj = nn.Parameter(torch.randn(E, I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        self.gate_proj_bias = nn.Parameter(torch.randn(E, I))
        self.up_proj_bias = nn.Parameter(torch.randn(E, I))
        self.down_proj_bias = nn.Parameter(torch.randn(E, H))
        self.act_fn = nn.SiLU()


class QuantizedAway(nn.Module):
    """The declared class after a quantizer replaced its tensors with ones named after them."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj_blocks = nn.Parameter(torch.zeros(E, 2 * I, H), requires_grad=False)
        self.down_proj_blocks = nn.Parameter(torch.zeros(E, H, I), requires_grad=False)
        self.act_fn = nn.SiLU()


def _routing(tokens=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=generator)
    index = torch.stack([torch.randperm(E, generator=generator)[:2] for _ in range(tokens)])
    return hidden, index, torch.rand(tokens, 2, generator=generator)


def _family(name="p", **declarations):
    return Family(name, [TypeSupport("made_up_moe")], **declarations)


# --- a. typed declarations, checked when the family is built -----------------------------------


@pytest.mark.parametrize("argument", ["experts_classes", "layout_overrides"])
def test_an_unknown_field_names_plugin_class_and_field(argument):
    from defuser.errors import DeclarationError

    with pytest.raises(DeclarationError) as raised:
        _family(**{argument: {"RoutedExperts": {"is_transpose": True}}})
    assert str(raised.value) == (
        "plugin 'p', class 'RoutedExperts': unknown field 'is_transpose' (did you mean 'is_transposed'?)"
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"has_bias": "yes"}, "field 'has_bias' must be True or False, got 'yes'"),
        ({"contract": "routd"}, "field 'contract' must be one of 'routed', 'expert_major', 'weighted_all'"),
        ({"identity_experts": -1}, "identity_experts must be a count of 0 or more"),
        ({"down_name": ""}, "field 'down_name' must be a non-empty name"),
        ({"post_expert_norm_by_expert": True}, "post_expert_norm_by_expert=True needs has_post_expert_norm=True"),
        ({"separate_gate_up": True, "has_gate": False}, "separate_gate_up=True needs has_gate=True"),
        ({"separate_gate_up": True, "is_concatenated": False}, "describe one gate_up tensor"),
        ({"down_name": "gate_up_proj"}, "the fused tensors need distinct names"),
    ],
)
def test_a_wrong_value_or_impossible_combination_fails_at_construction(fields, expected):
    from defuser.errors import DeclarationError

    with pytest.raises(DeclarationError, match=r"^plugin 'p', class 'RoutedExperts': ") as raised:
        _family(experts_classes={"RoutedExperts": fields})
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    ("argument", "kind"), [("dense_classes", "DenseLayout"), ("parallel_classes", "ParallelLayout")]
)
def test_dense_and_parallel_declarations_take_their_layout_classes(argument, kind):
    from defuser.errors import DeclarationError

    with pytest.raises(DeclarationError, match=rf"^plugin 'p', class 'Mlp': {argument} takes a {kind}, got dict"):
        _family(**{argument: {"Mlp": {"fused_name": "w12"}}})


def test_typed_declarations_are_frozen_checked_and_kept_in_line_with_the_layout():
    from defuser.family import ExpertsDecl, LayoutOverride

    layout_fields = {field.name for field in dataclasses.fields(ExpertsLayout)} - {"num_experts"}
    assert {field.name for field in dataclasses.fields(ExpertsDecl)} == layout_fields
    assert {field.name for field in dataclasses.fields(LayoutOverride)} == layout_fields
    defaults = ExpertsLayout(num_experts=0)
    for field in dataclasses.fields(ExpertsDecl):
        assert field.default == getattr(defaults, field.name), field.name
    family = _family(
        experts_classes={"RoutedExperts": ExpertsDecl(is_transposed=True), "Other": {"gate_style": "module"}},
        layout_overrides={"Decorated": LayoutOverride(is_concatenated=False), "Mapped": {"gate_first": False}},
    )
    assert family.experts_classes["Other"] == ExpertsDecl(gate_style="module")
    assert family.layout_overrides["Mapped"].changes() == {"gate_first": False}
    with pytest.raises(dataclasses.FrozenInstanceError):
        family.experts_classes["Other"].has_bias = True
    with pytest.raises(TypeError):
        ExpertsDecl(is_transpose=True)
    with pytest.raises(ValueError, match="sets no field"):
        LayoutOverride()
    with pytest.raises(ValueError, match="field 'gate_first' must be True or False"):
        LayoutOverride(gate_first=lambda module: False)


def test_a_plugin_whose_family_is_wrong_fails_to_load_and_defuser_plugins_says_why(tmp_path, monkeypatch, capsys):
    from defuser.cli import main

    (tmp_path / "defuser_typo_hooks.py").write_text(
        textwrap.dedent(
            """
            from defuser.family import Family
            from defuser.plugin_info import TypeSupport

            plugin = Family("typo", [TypeSupport("made_up_moe")], layout_overrides={"X": {"is_concatenatd": False}})
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _only_entry_points(monkeypatch, _EntryPoint("typo", "defuser_typo_hooks:plugin"))
    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("typo "))
    assert "plugin 'typo', class 'X': unknown field 'is_concatenatd' (did you mean 'is_concatenated'?)" in line
    assert not line.rstrip().endswith("ok")


# --- b. tensor names checked against the module -------------------------------------------------


def _refusal(manager, family, module):
    manager.register(family, family.info.name)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    with pytest.raises(ConversionError) as raised:
        convert_model(module)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    return str(raised.value)


def test_a_misspelt_tensor_name_is_refused_naming_plugin_class_field_and_the_tensors(defuser_plugin_manager):
    module = RoutedExperts()
    message = _refusal(
        defuser_plugin_manager, _family(experts_classes={"RoutedExperts": {"down_name": "down_projj"}}), module
    )
    assert (
        "plugin 'p', class 'RoutedExperts': field 'down_name' names tensor 'down_projj', but the module has no "
        "tensor 'down_projj' (did you mean 'down_proj'?); its tensors: gate_up_proj, down_proj"
    ) in message
    assert type(module) is RoutedExperts


def test_every_declared_name_wrong_is_refused_too(defuser_plugin_manager):
    declaration = {"gate_up_name": "w13", "down_name": "w2"}
    message = _refusal(defuser_plugin_manager, _family(experts_classes={"RoutedExperts": declaration}), RoutedExperts())
    assert "field 'gate_up_name' names tensor 'w13'" in message and "its tensors: gate_up_proj, down_proj" in message


def test_declared_biases_the_module_lacks_are_refused(defuser_plugin_manager):
    message = _refusal(
        defuser_plugin_manager, _family(experts_classes={"RoutedExperts": {"has_bias": True}}), RoutedExperts()
    )
    assert (
        "plugin 'p', class 'RoutedExperts': has_bias=True, but the module has no tensor 'gate_up_proj_bias'" in message
    )


def test_a_declared_storage_rank_the_tensors_do_not_have_is_refused(defuser_plugin_manager):
    message = _refusal(
        defuser_plugin_manager, _family(experts_classes={"RoutedExperts": {"flattened": True}}), RoutedExperts()
    )
    assert "tensor 'gate_up_proj' has shape (3, 8, 8), but flattened=True expects 2 dimensions" in message


@pytest.mark.parametrize("orientation", [{"is_transposed": True}, {"down_transposed": True}])
def test_an_orientation_the_shapes_contradict_is_refused_naming_the_fields(defuser_plugin_manager, orientation):
    family = _family(experts_classes={"RoutedExperts": orientation})
    message = _refusal(defuser_plugin_manager, family, RoutedExperts())
    assert "plugin 'p', class 'RoutedExperts': is_transposed=" in message
    assert "'gate_up_proj' (3, 8, 8)" in message and "'down_proj' (3, 8, 4)" in message
    assert "disagree on H or I: check the orientation fields" in message


def test_a_strict_manager_raises_the_declaration_error_as_a_plugin_error(monkeypatch):
    manager = DefuserPluginManager(autoload=False, strict=True)
    monkeypatch.setattr(plugins, "_manager", manager)
    manager.register(_family(experts_classes={"RoutedExperts": {"up_name": "x", "gate_up_name": "gate_up"}}), "p")
    with pytest.raises(PluginError, match=r"plugin 'p'.*field 'gate_up_name' names tensor 'gate_up'"):
        convert_model(RoutedExperts())


def test_a_class_whose_tensors_a_quantizer_replaced_is_left_alone(defuser_plugin_manager):
    defuser_plugin_manager.register(_family(experts_classes={"QuantizedAway": {}}), "p")
    assert convert_model(QuantizedAway()) is False


def test_a_right_declaration_converts_with_equal_outputs(defuser_plugin_manager):
    defuser_plugin_manager.register(_family(experts_classes={"RoutedExperts": {"has_bias": True}}), "p")
    module = RoutedExperts(bias=True)
    hidden, index, weights = _routing()
    with torch.no_grad():
        expected = module(hidden, index, weights)
        assert convert_model(module) is True
        assert torch.allclose(module(hidden, index, weights), expected, atol=1e-5)


# --- c. activation names ------------------------------------------------------------------------


def test_an_activation_the_class_lacks_is_refused_before_anything_changes(defuser_plugin_manager):
    module = RoutedExperts()
    message = _refusal(
        defuser_plugin_manager, _family(experts_classes={"RoutedExperts": {"activation": "act"}}), module
    )
    assert (
        "plugin 'p', class 'RoutedExperts': field 'activation' names 'act', which is not a callable attribute of "
        "the module (did you mean 'act_fn'?)"
    ) in message
    hidden, index, weights = _routing()
    with torch.no_grad():
        module(hidden, index, weights)  # still the fused module, still runs


def test_overrides_of_a_decorated_class_are_checked_against_its_modules(defuser_plugin_manager):
    from defuser.tiny import build_tiny_model

    model = build_tiny_model("qwen3_moe")
    experts = next(type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Experts"))
    family = Family("o", [TypeSupport("qwen3_moe")], layout_overrides={experts: {"activation": "act_fun"}})
    defuser_plugin_manager.register(family, "o")
    with pytest.raises(ConversionError, match=f"plugin 'o', class '{experts}': field 'activation' names 'act_fun'"):
        convert_model(model)
    impossible = Family(
        "x", [TypeSupport("qwen3_moe")], layout_overrides={experts: {"post_expert_norm_by_expert": True}}
    )
    defuser_plugin_manager.unregister("o")
    defuser_plugin_manager.register(impossible, "x")
    with pytest.raises(ConversionError, match=f"plugin 'x', class '{experts}': layout_overrides make an impossible"):
        convert_model(model)


# --- d. separate gate and up tensors with biases -------------------------------------------------


def test_separate_gate_up_with_biases_is_refused_not_dropped():
    from defuser.errors import DeclarationError

    with pytest.raises(ValueError, match="separate_gate_up=True with has_bias=True is not supported"):
        declared_experts_layout(SeparateBiased(), separate_gate_up=True, has_bias=True)
    with pytest.raises(DeclarationError, match=r"^plugin 'p', class 'SeparateBiased': separate_gate_up=True with"):
        _family(experts_classes={"SeparateBiased": {"separate_gate_up": True, "has_bias": True}})


def test_a_per_module_value_making_an_impossible_layout_is_refused(defuser_plugin_manager):
    declaration = {"separate_gate_up": True, "has_bias": lambda module: True}
    message = _refusal(
        defuser_plugin_manager, _family(experts_classes={"SeparateBiased": declaration}), SeparateBiased()
    )
    assert "plugin 'p', class 'SeparateBiased': separate_gate_up=True with has_bias=True is not supported" in message


# --- e. hook methods pluggy would never call ----------------------------------------------------


class _Misspelt:
    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="misspelt", model_types=(TypeSupport("made_up_moe"),))

    @hookimpl
    def defuser_detect_candiate(self, module, path, model_type):
        return None


def test_a_misspelt_hook_implementation_fails_the_plugin_naming_plugin_and_hook(caplog):
    manager = DefuserPluginManager(autoload=False)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        loaded = manager.register(_Misspelt(), "misspelt")
    expected = (
        "plugin 'misspelt': hook implementation 'defuser_detect_candiate' "
        "(did you mean 'defuser_detect_candidate'?) matches no defuser hookspec"
    )
    assert loaded.error == expected and expected in caplog.text
    assert manager.pm.get_plugin("misspelt") is None and manager.owner_of("made_up_moe") is None
    with pytest.raises(PluginError, match="defuser_detect_candiate"):
        DefuserPluginManager(autoload=False, strict=True).register(_Misspelt(), "misspelt")


def test_an_optional_hook_a_newer_core_may_define_is_accepted():
    class Ahead:
        @hookimpl(optionalhook=True)
        def defuser_hook_of_the_future(self):
            return None

    assert DefuserPluginManager(autoload=False).register(Ahead(), "ahead").error is None


def test_a_family_subclass_overriding_a_hook_without_hookimpl_fails_to_load():
    class Custom(Family):
        def defuser_patch_model(self, model, model_type):
            return ["patched"]

    loaded = DefuserPluginManager(autoload=False).register(Custom("custom", [TypeSupport("made_up_moe")]), "custom")
    assert loaded.error is not None
    assert loaded.error.startswith("plugin 'custom': ")
    assert (
        "Custom.defuser_patch_model is named like the hook 'defuser_patch_model' but has no @hookimpl" in loaded.error
    )

    class Marked(Family):
        @hookimpl
        def defuser_patch_model(self, model, model_type):
            return ["patched"]

    manager = DefuserPluginManager(autoload=False)
    assert manager.register(Marked("marked", [TypeSupport("made_up_moe")]), "marked").error is None
    assert manager.patch_model(nn.Linear(1, 1), "made_up_moe") == ["patched"]


def test_a_misspelt_unmarked_hook_method_fails_to_load():
    class Sloppy(Family):
        def defuser_detect_candiate(self, module, path, model_type):
            return None

    loaded = DefuserPluginManager(autoload=False).register(Sloppy("sloppy", [TypeSupport("made_up_moe")]), "sloppy")
    assert "named like the hook 'defuser_detect_candidate' (misspelt?) but has no @hookimpl" in loaded.error


# --- f. ranges read from the distribution before import -----------------------------------------


class _Dist:
    def __init__(self, name, requires):
        self.name, self.requires, self.metadata = name, requires, {"Name": name}


class _EntryPoint:
    """An entry point as importlib.metadata gives one (name, value, dist, load), loads counted."""

    group = plugins.ENTRY_POINT_GROUP

    def __init__(self, name, value, requires=None):
        self.name, self.value = name, value
        self.dist = _Dist(f"defuser-{name}", requires) if requires is not None else None
        self.loads = 0

    def load(self):
        self.loads += 1
        module_name, _, attribute = self.value.partition(":")
        __import__(module_name)
        return getattr(sys.modules[module_name], attribute)


def _only_entry_points(monkeypatch, *points):
    monkeypatch.setattr(plugins, "entry_points", lambda group: list(points))
    manager = DefuserPluginManager(autoload=True, allow=None, block=set())
    monkeypatch.setattr(plugins, "_manager", manager)
    return manager


def _write_plugin(tmp_path, monkeypatch, module, transformers=">=5.3.0"):
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from defuser.family import Family
            from defuser.plugin_info import TypeSupport

            plugin = Family("{module}", [TypeSupport("made_up_moe")], transformers="{transformers}")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_distribution_requiring_another_transformers_is_refused_without_import(tmp_path, monkeypatch):
    from defuser.compat import transformers_version

    _write_plugin(tmp_path, monkeypatch, "defuser_future_hooks")
    point = _EntryPoint("future", "defuser_future_hooks:plugin", ["defuser-core>=0.1,<1", "transformers>=99"])
    manager = _only_entry_points(monkeypatch, point)
    listed = {plugin.name: plugin for plugin in manager.describe()}
    assert listed["future"].error == (
        f"plugin 'future' requires transformers>=99, but transformers {transformers_version()} is installed"
    )
    assert listed["future"].distribution == "defuser-future"
    assert point.loads == 0 and "defuser_future_hooks" not in sys.modules


def test_core_requirements_and_extras_of_the_distribution(tmp_path, monkeypatch):
    _write_plugin(tmp_path, monkeypatch, "defuser_meta_hooks", transformers=">=99")
    core = _EntryPoint("old_core", "defuser_meta_hooks:plugin", ["defuser_core<0.0.1"])
    # Metadata that allows this transformers wins over the Family's hand-typed copy; the
    # requirement of an extra does not count.
    fine = _EntryPoint("fine", "defuser_meta_hooks:plugin", ["transformers>=5.3", 'transformers>=99; extra == "test"'])
    manager = _only_entry_points(monkeypatch, core, fine)
    listed = {plugin.name: plugin for plugin in manager.describe()}
    assert listed["old_core"].error.startswith("plugin 'old_core' requires defuser-core<0.0.1, but defuser-core ")
    assert core.loads == 0
    assert listed["fine"].error is None and fine.loads == 1


def test_without_a_distribution_the_family_ranges_decide(tmp_path, monkeypatch):
    _write_plugin(tmp_path, monkeypatch, "defuser_bare_hooks", transformers=">=99")
    point = _EntryPoint("bare", "defuser_bare_hooks:plugin")
    manager = _only_entry_points(monkeypatch, point)
    listed = {plugin.name: plugin for plugin in manager.describe()}["bare"]
    assert listed.error.startswith("plugin 'bare' requires transformers>=99, but ")
    assert point.loads == 1


# --- g. defuser plugins: hooks, tested releases, JSON -------------------------------------------


def test_defuser_plugins_shows_hooks_and_tested_releases_and_prints_json(defuser_plugin_manager, capsys):
    from defuser.cli import main

    defuser_plugin_manager.register(
        Family("listed", [TypeSupport("made_up_moe")], tested_on=["5.3.0", "5.25.0"]), "listed"
    )
    defuser_plugin_manager.register(_Misspelt(), "misspelt")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "hooks implemented:" in out
    hooks_line = next(line for line in out.splitlines() if line.startswith("  listed: "))
    assert {"detect_candidate", "preload_plan", "patch_model", "plugin_info"} <= set(
        hooks_line.removeprefix("  listed: ").split(", ")
    )
    assert "5.3.0, 5.25.0" in next(line for line in out.splitlines() if line.startswith("listed "))

    assert main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {plugin["name"]: plugin for plugin in report["plugins"]}
    listed = by_name["listed"]
    assert listed["status"] == "ok" and listed["error"] is None
    assert listed["tested_on"] == ["5.3.0", "5.25.0"]
    assert "defuser_detect_candidate" in listed["hooks"] and "defuser_plugin_info" in listed["hooks"]
    assert [support["model_type"] for support in listed["model_types"]] == ["made_up_moe"]
    assert listed["transformers"] == ">=5.3.0" and listed["core"]
    assert by_name["misspelt"]["status"] == "error" and "defuser_detect_candiate" in by_name["misspelt"]["error"]
    assert report["transformers"] and report["defuser_core"]
