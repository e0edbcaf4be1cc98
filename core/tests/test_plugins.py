"""Plugin manager: entry-point discovery, switches, failures, conflicts, laziness."""

import importlib.metadata
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import defuser.plugins as plugins
from defuser import PluginInfo, TypeSupport, convert_model, hookimpl, replace_fused_blocks
from defuser.api import ConversionError, find_candidates
from defuser.engine.experts import DefusedExperts
from defuser.engine.preload import is_patched
from defuser.plugins import (
    ENV_DISABLE_AUTOLOAD,
    ENV_DISABLED_PLUGINS,
    ENV_LOAD_PLUGINS,
    DefuserPluginManager,
    PluginError,
    configure,
)
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

FIRST_PARTY = {"qwen", "mixtral", "glm"}


def _loaded(manager):
    return {p.name for p in manager.describe() if p.error is None}


def test_entry_points_are_discovered():
    manager = DefuserPluginManager()
    assert FIRST_PARTY | {"generic"} <= _loaded(manager)
    qwen = next(p for p in manager.describe() if p.name == "qwen")
    assert qwen.distribution == "defuser-qwen" and qwen.version == "0.1.0"
    assert qwen.info.claims("qwen3_moe") and qwen.info.support_for("qwen3_moe").preload


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert _loaded(DefuserPluginManager()) == {"generic"}


def test_allow_and_block_lists(monkeypatch):
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "qwen,glm")
    assert _loaded(DefuserPluginManager()) == {"generic", "qwen", "glm"}
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "")
    assert _loaded(DefuserPluginManager()) == {"generic"}
    monkeypatch.delenv(ENV_LOAD_PLUGINS)
    everything = _loaded(DefuserPluginManager())
    assert {"generic", "qwen", "glm", "mixtral"} <= everything
    monkeypatch.setenv(ENV_DISABLED_PLUGINS, "mixtral")
    assert _loaded(DefuserPluginManager()) == everything - {"mixtral"}
    assert _loaded(DefuserPluginManager(allow=["mixtral"], block=[])) == {"generic", "mixtral"}


class _Broken:
    @hookimpl
    def defuser_plugin_info(self):
        raise RuntimeError("cannot describe myself")


class _TooNew:
    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="too_new", transformers=">=99")


def test_broken_plugins_are_reported_and_skipped(caplog):
    manager = DefuserPluginManager(autoload=False)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        broken = manager.register(_Broken(), "broken")
        too_new = manager.register(_TooNew(), "too_new")
    assert "cannot describe myself" in broken.error and "'broken'" in caplog.text
    assert "defuser_plugin_info" in broken.error
    assert "plugin 'too_new' requires transformers>=99, but transformers 5." in too_new.error
    assert _loaded(manager) == {"generic"}
    with pytest.raises(PluginError, match="broken"):
        DefuserPluginManager(autoload=False, strict=True).register(_Broken(), "broken")


def _claimer(name, priority):
    class Claimer:
        @hookimpl
        def defuser_plugin_info(self):
            return PluginInfo(name=name, model_types=(TypeSupport("toy"),), priority=priority)

    return Claimer()


def test_conflicts_resolve_by_priority_then_name(caplog):
    manager = DefuserPluginManager(autoload=False)
    manager.register(_claimer("zeta", 0), "zeta")
    manager.register(_claimer("alpha", 0), "alpha")
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert manager.owner_of("toy") == "alpha"
    assert "alpha" in caplog.text and "zeta" in caplog.text
    manager.register(_claimer("boss", 5), "boss")
    assert manager.owner_of("toy") == "boss"


@pytest.mark.subprocess
def test_import_defuser_loads_no_plugin():
    code = "import sys, defuser; print(sorted(m for m in sys.modules if m.startswith('defuser_')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- versioning against core ------------------------------------------------------------


def _versioned(name, core):
    class Versioned:
        @hookimpl
        def defuser_plugin_info(self):
            return PluginInfo(name=name, model_types=(TypeSupport("qwen3_moe"),), core=core, priority=99)

    return Versioned()


@pytest.mark.parametrize("core_range", [">=99", "<0.1", ">=0.1,<0.1.0"])
def test_core_refuses_a_plugin_outside_its_core_range(core_range, caplog):
    from defuser import __version__

    manager = DefuserPluginManager(autoload=False)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        refused = manager.register(_versioned("from_the_future", core_range), "from_the_future")
    expected = (
        f"plugin 'from_the_future' requires defuser-core{core_range}, but defuser-core {__version__} is installed"
    )
    assert refused.error == expected
    assert expected in caplog.text
    assert manager.owner_of("qwen3_moe") is None  # refused: its claims count for nothing
    strict = DefuserPluginManager(autoload=False, strict=True)
    with pytest.raises(PluginError, match="from_the_future"):
        strict.register(_versioned("from_the_future", core_range), "from_the_future")


def test_plugin_inside_the_core_range_loads():
    manager = DefuserPluginManager(autoload=False)
    assert manager.register(_versioned("current", ">=0.1,<1"), "current").error is None
    assert manager.owner_of("qwen3_moe") == "current"


def test_an_invalid_core_range_is_reported_not_raised():
    loaded = DefuserPluginManager(autoload=False).register(_versioned("sloppy", "version one"), "sloppy")
    assert loaded.error == "plugin 'sloppy' declares an invalid defuser-core range 'version one'"


# --- import and hook failures -----------------------------------------------------------


def test_a_plugin_that_fails_to_import_is_named_and_the_others_load(monkeypatch, caplog):
    real = plugins.entry_points

    def with_a_broken_one(group):
        broken = importlib.metadata.EntryPoint(name="broken", value="no_such_module_anywhere.hooks:plugin", group=group)
        return [broken, *real(group=group)]

    monkeypatch.setattr(plugins, "entry_points", with_a_broken_one)
    manager = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", manager)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        listed = {p.name: p for p in manager.describe()}
    assert listed["broken"].error.startswith(
        "plugin 'broken': import of no_such_module_anywhere.hooks:plugin failed: ModuleNotFoundError"
    )
    assert "'broken'" in caplog.text
    assert FIRST_PARTY <= _loaded(manager)
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model) is True
    assert {c.plugin for c in find_candidates(build_tiny_model("qwen3_moe"))} == {"qwen"}


class _Grabby:
    """Wins qwen3_moe (priority 10); the hooks given an error raise it on experts modules."""

    def __init__(self, detect=None, preload=None, defuse=None):
        self.errors = {"detect": detect, "preload": preload, "defuse": defuse}

    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="grabby", model_types=(TypeSupport("qwen3_moe", preload=True),), priority=10)

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if self.errors["detect"] is not None and path.endswith("experts"):
            raise self.errors["detect"]
        return None  # the generic engine detects what this plugin leaves

    @hookimpl
    def defuser_preload_plan(self, model_type):
        if self.errors["preload"] is not None:
            raise self.errors["preload"]
        return None

    @hookimpl
    def defuser_defuse_candidate(self, candidate):
        if self.errors["defuse"] is not None:
            raise self.errors["defuse"]
        return None


def _two_types():
    """One module tree holding a qwen3_moe and a mixtral model (two model types)."""
    return nn.ModuleDict({"qwen": build_tiny_model("qwen3_moe"), "mixtral": build_tiny_model("mixtral")})


def test_a_raising_detect_hook_of_the_owner_falls_back_to_the_generic_engine(monkeypatch, caplog):
    # The owner's declaration does not fit (it raises): the generic engine, which can read
    # Qwen3MoeExperts from its decorator, defuses those modules, self-checked, with one warning.
    manager = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", manager)
    manager.register(_Grabby(detect=KeyError("no layout for you")), "grabby")
    model = _two_types()
    inputs = tiny_inputs(model["qwen"])
    reference = {name: tiny_forward(sub, inputs) for name, sub in model.items()}
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert convert_model(model) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "hook" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per plugin and class, not once per module
    assert "plugin 'grabby' (no version) does not fit transformers" in warnings[0]
    assert "hook defuser_detect_candidate raised KeyError: 'no layout for you'" in warnings[0]
    assert "qwen.model.layers.0.mlp.experts (Qwen3MoeExperts)" in warnings[0]
    assert "the generic engine defuses it" in warnings[0]
    for sub in model.values():
        assert all(isinstance(layer.mlp.experts, DefusedExperts) for layer in sub.model.layers)
    for name, sub in model.items():
        assert torch.allclose(tiny_forward(sub, inputs), reference[name], atol=1e-5)
    with pytest.raises(PluginError, match=r"plugin 'grabby': hook defuser_detect_candidate raised KeyError"):
        strict = DefuserPluginManager(strict=True)
        strict.register(_Grabby(detect=KeyError("x")), "grabby")
        monkeypatch.setattr(plugins, "_manager", strict)
        convert_model(_two_types())


class _Moody:
    """Two instances share this code; only the angry one raises (attribution by instance)."""

    def __init__(self, angry):
        self.angry = angry

    @hookimpl(tryfirst=True)
    def defuser_detect_candidate(self, module, path, model_type):
        if self.angry and path.endswith("experts"):
            raise ValueError(f"cannot stand {path}")
        return None


def test_a_raising_detect_hook_of_a_non_owner_is_skipped(defuser_plugin_manager, caplog):
    # Autoload is off: qwen3_moe has no owner, every plugin is asked, then the generic engine.
    defuser_plugin_manager.register(_Moody(angry=False), "calm")
    defuser_plugin_manager.register(_Moody(angry=True), "angry")
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert convert_model(model) is True
    assert "plugin 'angry': hook defuser_detect_candidate raised ValueError: cannot stand" in caplog.text
    assert "'calm'" not in caplog.text
    assert all(isinstance(layer.mlp.experts, DefusedExperts) for layer in model.model.layers)
    assert torch.allclose(tiny_forward(model, inputs), reference, atol=1e-5)


def test_a_raising_preload_hook_names_plugin_and_hook_and_patches_nothing(monkeypatch):
    manager = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", manager)
    manager.register(_Grabby(preload=RuntimeError("plan lost")), "grabby")
    with pytest.raises(PluginError, match=r"plugin 'grabby': hook defuser_preload_plan raised RuntimeError: plan lost"):
        replace_fused_blocks("qwen3_moe")
    assert not is_patched("qwen3_moe")
    assert find_candidates(build_tiny_model("qwen3_moe")), "construction must still build fused experts"
    assert replace_fused_blocks("mixtral") is True  # other plugins still patch


def test_a_raising_defuse_hook_names_plugin_hook_and_path(monkeypatch):
    manager = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", manager)
    manager.register(_Grabby(defuse=IndexError("expert 9 of 8")), "grabby")
    model = _two_types()
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert message.startswith("defusing qwen.model.layers.0.mlp.experts (Qwen3MoeExperts) failed: ")
    assert "plugin 'grabby': hook defuser_defuse_candidate raised IndexError: expert 9 of 8" in message
    assert isinstance(caught.value.__cause__, PluginError)
    assert isinstance(caught.value.__cause__.__cause__, IndexError)
    assert not any(isinstance(m, DefusedExperts) for m in model["qwen"].modules())
    # the rest of the model can still be converted once the broken plugin is gone
    manager.unregister("grabby")
    assert convert_model(model) is True
    assert not find_candidates(model)


# --- choosing plugins from Python ---------------------------------------------------------


def test_configure_arguments_win_over_the_environment(monkeypatch):
    monkeypatch.setattr(plugins, "_manager", None)  # restored after the test
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "qwen")
    monkeypatch.setenv(ENV_DISABLED_PLUGINS, "glm")
    assert _loaded(plugins.get_plugin_manager()) == {"generic", "qwen"}
    assert _loaded(configure(allow=["glm", "mixtral"], block=[])) == {"generic", "glm", "mixtral"}
    assert _loaded(configure(allow=[])) == {"generic"}
    assert _loaded(configure(block=["qwen"])) == {"generic"}  # the env allow-list still applies
    monkeypatch.delenv(ENV_LOAD_PLUGINS)
    everything = _loaded(configure())
    assert "glm" not in everything and FIRST_PARTY - {"glm"} <= everything
    assert _loaded(configure(block=["qwen", "mixtral"])) == everything - {"qwen", "mixtral"} | {"glm"}
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert _loaded(configure()) == {"generic"}
    assert FIRST_PARTY <= _loaded(configure(autoload=True, block=[]))


def test_the_configured_manager_is_the_one_convert_model_uses(monkeypatch):
    monkeypatch.setattr(plugins, "_manager", None)
    configure(allow=[])  # no plugin: the generic engine alone handles qwen3_moe
    model = build_tiny_model("qwen3_moe")
    assert {c.plugin for c in find_candidates(model)} == {"generic"}
    configure(allow=["qwen"])
    assert {c.plugin for c in find_candidates(model)} == {"qwen"}
    assert convert_model(model) is True
