"""Plugin manager: entry-point discovery, switches, failures, conflicts, laziness."""

import logging
import subprocess
import sys

import pytest

from defuser import PluginInfo, TypeSupport, hookimpl
from defuser.plugins import (
    ENV_DISABLE_AUTOLOAD,
    ENV_DISABLED_PLUGINS,
    ENV_LOAD_PLUGINS,
    DefuserPluginManager,
    PluginError,
)

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
    assert "requested transformers>=99 but found" in too_new.error
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


def test_import_defuser_loads_no_plugin():
    code = "import sys, defuser; print(sorted(m for m in sys.modules if m.startswith('defuser_')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
