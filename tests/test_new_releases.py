"""A new transformers release, handled on the day it ships.

* A plugin whose declaration no longer fits the installed release (a class it declares as
  undecorated is decorated now, an attribute it reads is gone) falls back to the generic
  engine, with one warning naming the plugin, its version and the reason; a fused module the
  generic engine cannot read is refused with that reason, and the model is left as it was.
* ``replace_fused_blocks`` patches any model type the generic engine can handle, claimed by a
  plugin or not, and fused checkpoints load into the patched models with equal outputs.
* ``defuser plugins`` says which installed plugins are untested on the installed release and
  which of their types the generic engine then handles.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING

import defuser.plugins as plugins
from defuser import (
    PluginInfo,
    TypeSupport,
    convert_model,
    defused_blocks,
    hookimpl,
    replace_fused_blocks,
    restore_fused_blocks,
)
from defuser.api import ConversionError, find_candidates
from defuser.compat import transformers_version
from defuser.engine.experts import DefusedExperts
from defuser.engine.generic import TESTED_TYPES
from defuser.engine.preload import is_patched
from defuser.family import Family
from defuser.plugins import DefuserPluginManager, get_plugin_manager, list_plugins
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5
INSTALLED = str(transformers_version())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore(defuser_restore_patches):
    yield


def _fresh_manager(monkeypatch: pytest.MonkeyPatch, autoload: bool = False) -> DefuserPluginManager:
    manager = DefuserPluginManager(autoload=autoload)
    monkeypatch.setattr(plugins, "_manager", manager)
    return manager


def _state(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (id(tensor), tensor.detach().clone()) for name, tensor in model.state_dict(keep_vars=True).items()}


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


# --- plugins that do not fit the release ---------------------------------------------------


def _stale_family(tested_on: list[str]) -> Family:
    """Declares Qwen3MoeExperts as undecorated experts, as longcat did before 5.25.0."""
    return Family(
        "stale",
        [TypeSupport("qwen3_moe")],
        experts_classes={"Qwen3MoeExperts": {"identity_experts": 0}},
        priority=10,
        tested_on=tested_on,
    )


def test_a_class_decorated_since_falls_back_to_the_generic_engine_with_one_warning(monkeypatch, caplog):
    manager = _fresh_manager(monkeypatch)
    manager.register(_stale_family(["4.0.0"]), "stale")
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    with caplog.at_level(logging.INFO, logger="defuser"):
        assert convert_model(model) is True
    warnings = [message for message in _messages(caplog, logging.WARNING) if "does not fit" in message]
    assert len(warnings) == 1, warnings  # one per plugin and class, not one per module
    assert f"plugin 'stale' (no version) does not fit transformers {INSTALLED}" in warnings[0]
    assert "DeclarationMismatch: Qwen3MoeExperts is declared as undecorated experts, but transformers" in warnings[0]
    assert "the generic engine defuses it (self-checked)" in warnings[0]
    assert all(isinstance(layer.mlp.experts, DefusedExperts) for layer in model.model.layers)
    assert (tiny_forward(model, inputs) - reference).abs().max() <= ATOL


def test_on_a_release_the_plugin_was_tested_on_the_same_fallback_is_no_warning(monkeypatch, caplog):
    manager = _fresh_manager(monkeypatch)
    manager.register(_stale_family([INSTALLED]), "stale")
    model = build_tiny_model("qwen3_moe")
    with caplog.at_level(logging.INFO, logger="defuser"):
        assert convert_model(model) is True
    assert not [message for message in _messages(caplog, logging.WARNING) if "does not fit" in message]
    assert any("does not fit" in message for message in _messages(caplog, logging.INFO))


class _ReadsAGoneAttribute:
    """Owns qwen3_moe and reads an attribute its experts no longer have (longcat's zero_expert_num)."""

    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="gone", model_types=(TypeSupport("qwen3_moe"),), priority=10)

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if path.endswith("experts"):
            return module.zero_expert_num  # AttributeError
        return None


def test_an_attribute_gone_falls_back_to_the_generic_engine(monkeypatch, caplog):
    manager = _fresh_manager(monkeypatch)
    manager.register(_ReadsAGoneAttribute(), "gone")
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert convert_model(model) is True
    assert "AttributeError: 'Qwen3MoeExperts' object has no attribute 'zero_expert_num'" in caplog.text
    assert (tiny_forward(model, inputs) - reference).abs().max() <= ATOL


def test_a_fused_module_neither_can_read_is_refused_and_the_model_left_as_it_was(monkeypatch):
    manager = _fresh_manager(monkeypatch)
    manager.register(_ReadsAGoneAttribute(), "gone")
    model = build_tiny_model("qwen3_moe")
    for layer in model.model.layers:  # no decorator flags: the generic engine cannot read them
        del layer.mlp.experts.has_gate
    before = _state(model)
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert "cannot defuse 2 module(s), so the model was left as it was" in message
    assert "model.layers.0.mlp.experts, model.layers.1.mlp.experts (Qwen3MoeExperts, model type 'qwen3_moe')" in message
    assert f"plugin 'gone' (no version) does not fit transformers {INSTALLED}" in message
    assert "AttributeError" in message and "the generic engine does not know this structure" in message
    after = model.state_dict(keep_vars=True)
    assert all(id(after[name]) == before[name][0] and torch.equal(after[name], before[name][1]) for name in after)


def test_every_first_party_plugin_says_which_releases_it_was_tested_on():
    folders = {path.name for path in (ROOT / "plugins").iterdir() if (path / "pyproject.toml").exists()}
    loaded = {plugin.name: plugin for plugin in list_plugins() if plugin.info is not None}
    for name in folders:
        assert loaded[name].info.tested_on, f"plugin {name!r} declares no tested_on releases"
    with pytest.raises(ValueError, match=r"plugin 'bad': tested_on holds 'latest', not a release version"):
        PluginInfo(name="bad", tested_on=("latest",))


# --- replace_fused_blocks for types no plugin claims ------------------------------------------


def _fused_checkpoint_loads_defused(model_type: str, folder: Path) -> None:
    """A fused checkpoint of ``model_type`` loads into the patched classes with equal outputs."""
    stock = build_tiny_model(model_type)
    inputs = tiny_inputs(stock)
    reference = tiny_forward(stock, inputs)
    stock.save_pretrained(folder)
    with defused_blocks(model_type) as patched:
        assert patched, f"replace_fused_blocks({model_type!r}) patched nothing"
        built = build_tiny_model(model_type)
        assert find_candidates(built) == [], "construction built fused blocks"
        assert any(isinstance(module, DefusedExperts) for module in built.modules())
        loaded = type(stock).from_pretrained(folder, config=stock.config).eval()
        assert find_candidates(loaded) == [], "fused blocks after a patched load"
        difference = (tiny_forward(loaded, inputs) - reference).abs().max().item()
        assert difference <= ATOL, f"{model_type}: a fused checkpoint loads with outputs off by {difference}"
    assert not is_patched(model_type)


@pytest.mark.parametrize("model_type", sorted(support.model_type for support in TESTED_TYPES))
def test_types_no_plugin_claims_are_patched_by_the_generic_engine(model_type: str, tmp_path: Path) -> None:
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"model type {model_type!r} does not exist in transformers {INSTALLED}")
    assert get_plugin_manager().owner_of(model_type) is None, f"a plugin claims {model_type}: move it there"
    _fused_checkpoint_loads_defused(model_type, tmp_path)


def test_any_decorated_type_is_patched_with_no_plugin_installed(defuser_plugin_manager, tmp_path: Path) -> None:
    # As a decorated class of a future release would be: no plugin knows qwen3_moe here.
    assert defuser_plugin_manager.owner_of("qwen3_moe") is None
    assert replace_fused_blocks("qwen3_moe") is True
    assert restore_fused_blocks("qwen3_moe") == ["qwen3_moe"]
    _fused_checkpoint_loads_defused("qwen3_moe", tmp_path)
    assert replace_fused_blocks("llama") is False, "nothing fused in llama: nothing to patch"


def test_an_undescribed_subclass_makes_replace_fused_blocks_an_error(defuser_plugin_manager) -> None:
    if "ergo" not in CONFIG_MAPPING:
        pytest.skip(f"ergo does not exist in transformers {INSTALLED}")
    with pytest.raises(ConversionError) as caught:
        replace_fused_blocks("ergo")
    message = str(caught.value)
    assert "replace_fused_blocks('ergo') cannot patch transformers.models.ergo.modeling_ergo.ErgoExperts" in message
    assert "ErgoExperts.forward overrides the forward of the decorated ErgoExpertProjections" in message
    assert message.endswith("nothing was patched")
    assert not is_patched("ergo")
    model = build_tiny_model("ergo")
    assert not any(isinstance(module, DefusedExperts) for module in model.modules())


# --- defuser plugins ------------------------------------------------------------------------------


def test_defuser_plugins_says_untested_and_what_is_handled_generically(defuser_plugin_manager, capsys) -> None:
    from defuser.cli import main

    defuser_plugin_manager.register(Family("current", [TypeSupport("mixtral")], tested_on=[INSTALLED]), "current")
    defuser_plugin_manager.register(Family("older", [TypeSupport("qwen3_moe")], tested_on=["4.0.0"]), "older")
    stale = _stale_family(["4.0.0"])
    stale.info = PluginInfo(name="stale", model_types=(TypeSupport("olmoe"),), tested_on=("4.0.0",))
    stale.experts_classes = {"OlmoeExperts": {}, "OlmoeRenamedAwayExperts": {}}
    defuser_plugin_manager.register(stale, "stale")
    absent = Family("elsewhere", [TypeSupport("no_such_moe")], tested_on=["4.0.0"])
    defuser_plugin_manager.register(absent, "elsewhere")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("-", " "))}
    assert lines["current"].rstrip().endswith("ok") and INSTALLED in lines["current"]
    assert lines["older"].rstrip().endswith(f"ok, untested on {INSTALLED}")
    assert f"older: untested on transformers {INSTALLED}; handled generically there:" in out
    assert "  qwen3_moe: decorated experts, read from their flags (no declaration)" in out
    assert "  olmoe: OlmoeExperts decorated now: its flags replace the declaration" in out
    assert "  declared, but not in this transformers: OlmoeRenamedAwayExperts" in out
    assert "current: untested" not in out
    assert "elsewhere: untested on" in out and "(nothing: none of its model types exists in this transformers)" in out
