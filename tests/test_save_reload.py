"""Save and reload: a defused model's checkpoint loads again, the way the README table says.

For every model type the installed plugins declare, a tiny model is built and run, defused
with ``convert_model`` and saved with ``save_pretrained``; for the types ``replace_fused_blocks``
patches, another one is built defused from the start and saved the same way.  Then:

* every checkpoint of a type whose table row says "stock transformers" is loaded into the stock
  fused class by ONE subprocess that never imports defuser (checked), and must give the
  outputs of the model that was saved;
* every checkpoint of a type whose row says ``replace_fused_blocks`` is loaded inside
  ``defused_blocks(model_type)`` here, with the same check; that subprocess also tries them
  with stock transformers, which must fail (else the row should say "stock");
* a type the table says cannot reload is an expected failure (strict: once it reloads, the
  table must change).

The tiny configs are handed to ``from_pretrained`` as objects (pickled through the subprocess):
some lose derived values in ``config.json``, and this test is about the weights.  Every tiny
config passes transformers' own validation where the release has one (tested here too).
The same test also covers undoing ``replace_fused_blocks``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from packaging.version import Version
from torch import nn

import defuser.tiny
from defuser import convert_model, defused_blocks, replace_fused_blocks, restore_fused_blocks
from defuser.api import find_candidates
from defuser.engine.experts import DefusedExperts
from defuser.engine.preload import is_patched
from defuser.plugin_info import RELOAD_NONE, RELOAD_PATCHED, RELOAD_STOCK, TypeSupport
from defuser.plugins import list_plugins
from defuser.tables import reload_cell
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs
from defuser_testkit.checks import zero_identity_rows

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _undo_patches(defuser_restore_patches: None) -> None:
    """Every replace_fused_blocks a test makes is undone after it."""


def _version() -> Version:
    import transformers

    return Version(transformers.__version__)


def _declared() -> dict[str, TypeSupport]:
    """Every row of the README table: the plugins' types and those the generic engine alone handles."""
    from defuser.engine.generic import TESTED_TYPES

    declared = {support.model_type: support for support in TESTED_TYPES}
    declared.update(
        (support.model_type, support)
        for plugin in list_plugins()
        if plugin.info is not None
        for support in plugin.info.model_types
    )
    return declared


def _unavailable(support: TypeSupport) -> str | None:
    """Why ``support.model_type`` cannot be built with the installed transformers, or None."""
    from transformers import CONFIG_MAPPING

    if support.model_type not in CONFIG_MAPPING:
        return f"model type {support.model_type!r} does not exist in transformers {_version()}"
    if support.min_transformers and _version() < Version(support.min_transformers):
        return f"{support.model_type!r} is tested from transformers {support.min_transformers} on"
    return None


def _preload_here(support: TypeSupport) -> bool:
    """True when ``replace_fused_blocks`` patches the type on the installed transformers."""
    return support.preload and not (
        support.preload_min_transformers and _version() < Version(support.preload_min_transformers)
    )


def _expected_failure(support: TypeSupport) -> str | None:
    """Why the table says a checkpoint of this type cannot reload here, or None."""
    if support.reload == RELOAD_NONE:
        return f"table: {reload_cell(support)}"
    if support.reload_on(_version()) == RELOAD_PATCHED and not _preload_here(support):
        return f"table: {reload_cell(support)}; replace_fused_blocks does not patch it on {_version()}"
    return None


DECLARED = _declared()
AVAILABLE = {name: support for name, support in DECLARED.items() if _unavailable(support) is None}


def _params(names: list[str]) -> list[Any]:
    params = []
    for name in sorted(names):
        support = DECLARED[name]
        reason = _unavailable(support)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        failure = _expected_failure(support)
        if failure and not reason:
            marks.append(pytest.mark.xfail(reason=failure, strict=True))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


# --- building and saving ------------------------------------------------------------------


@dataclass
class Saved:
    """One saved checkpoint and what loading it must give back."""

    model_type: str
    kind: str  # "converted" (convert_model) or "built" (built after replace_fused_blocks)
    folder: Path
    model_class: type
    left_fused: list[str] = field(default_factory=list)
    error: str | None = None
    # Where stock transformers saved the same model before it was defused ("converted" only).
    stock_folder: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.model_type}"


@contextlib.contextmanager
def _without_config_validation(model: nn.Module):
    """Save tiny configs that transformers' validators would reject (the weights are the point)."""
    from transformers import PretrainedConfig

    classes = {type(m.config) for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    with contextlib.ExitStack() as stack:
        for cls in classes:
            if hasattr(cls, "validate"):
                stack.enter_context(mock.patch.object(cls, "validate", lambda self: None))
        yield


def _save(model: nn.Module, saved: Saved, inputs: dict[str, Any], reference: torch.Tensor) -> None:
    """``save_pretrained`` plus what the loaders need: the inputs, the output to match and the
    config object."""
    saved.folder.mkdir(parents=True)
    with _without_config_validation(model):
        model.save_pretrained(saved.folder)
    torch.save(inputs, saved.folder / "inputs.pt")
    torch.save(reference, saved.folder / "reference.pt")
    (saved.folder / "config.pkl").write_bytes(pickle.dumps(model.config))


def _save_converted(model_type: str, root: Path) -> Saved:
    saved = Saved(model_type, "converted", root / "converted" / model_type, nn.Module)
    try:
        model = build_tiny_model(model_type)
        saved.model_class = type(model)
        zero_identity_rows(model)
        inputs = tiny_inputs(model)
        reference = tiny_forward(model, inputs)
        saved.stock_folder = root / "stock" / model_type
        with _without_config_validation(model):
            model.save_pretrained(saved.stock_folder)
        assert convert_model(model) is True, "nothing was defused"
        _save(model, saved, inputs, reference)  # the fused model's output
    except Exception as error:
        saved.error = f"{type(error).__name__}: {error}"
    return saved


def _save_built(model_type: str, root: Path) -> Saved:
    saved = Saved(model_type, "built", root / "built" / model_type, nn.Module)
    try:
        with defused_blocks(model_type) as patched:
            assert patched, "replace_fused_blocks patched nothing"
            model = build_tiny_model(model_type)
            saved.model_class = type(model)
            saved.left_fused = [candidate.path for candidate in find_candidates(model)]
            # Saved while patched: the patched checkpoint mapping names the per-expert keys.
            inputs = tiny_inputs(model)
            _save(model, saved, inputs, tiny_forward(model, inputs))
    except Exception as error:
        saved.error = f"{type(error).__name__}: {error}"
    return saved


# --- loading --------------------------------------------------------------------------------

# Runs in a fresh interpreter that must not import defuser: the inputs are the saved ones, and
# tiny_forward comes from defuser/tiny.py loaded by path under another name (it imports torch and
# transformers only), with the model types fed embeddings given by the manifest instead of the
# plugins' recipes.
_STOCK_LOADER = r"""
import importlib, importlib.util, json, pickle, sys
from pathlib import Path
import torch
import transformers
transformers.logging.set_verbosity_error()
manifest = json.loads(Path(sys.argv[1]).read_text())
spec = importlib.util.spec_from_file_location("_tiny_helpers", manifest["tiny"])
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
embeds_only = set(manifest["embeds_only"])
tiny.tiny_recipe = lambda model_type: type("Recipe", (), {"embeds_only": model_type in embeds_only})()
KEY_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")
results = {}
for entry in manifest["checkpoints"]:
    folder = Path(entry["folder"])
    try:
        cls = getattr(importlib.import_module(entry["module"]), entry["class"])
        config = pickle.loads((folder / "config.pkl").read_bytes())
        model, info = cls.from_pretrained(folder, config=config, output_loading_info=True)
        model.eval()
        reference = torch.load(folder / "reference.pt")
        output = tiny.tiny_forward(model, torch.load(folder / "inputs.pt", weights_only=False))
        problems = {k: sorted(v)[:3] for k, v in info.items() if v and k in KEY_PROBLEMS}
        results[entry["key"]] = {"difference": (output - reference).abs().max().item(), "problems": problems}
    except Exception as error:
        results[entry["key"]] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
results["__defuser_imported__"] = any(name == "defuser" or name.startswith("defuser.") for name in sys.modules)
Path(sys.argv[2]).write_text(json.dumps(results))
"""


def _load_stock(checkpoints: list[Saved], root: Path) -> dict[str, Any]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    manifest = {
        "tiny": defuser.tiny.__file__,
        "embeds_only": sorted(name for name in CONFIG_MAPPING_NAMES if defuser.tiny.tiny_recipe(name).embeds_only),
        "checkpoints": [
            {
                "key": saved.key,
                "folder": str(saved.folder),
                "module": saved.model_class.__module__,
                "class": saved.model_class.__qualname__,
            }
            for saved in checkpoints
        ],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-c", _STOCK_LOADER, str(root / "manifest.json"), str(root / "stock.json")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert completed.returncode == 0, f"the stock loader failed:\n{completed.stderr[-3000:]}"
    return json.loads((root / "stock.json").read_text())


def _load_patched(saved: Saved) -> dict[str, Any]:
    try:
        with defused_blocks(saved.model_type) as patched:
            if not patched:
                return {"error": "replace_fused_blocks patched nothing"}
            config = pickle.loads((saved.folder / "config.pkl").read_bytes())
            model, info = saved.model_class.from_pretrained(saved.folder, config=config, output_loading_info=True)
            model.eval()
            left = [candidate.path for candidate in find_candidates(model)]
            output = tiny_forward(model, tiny_inputs(model))
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    reference = torch.load(saved.folder / "reference.pt")
    problems = {k: sorted(v)[:3] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys")}
    if left:
        problems["still fused after a patched load"] = left[:3]
    return {"difference": (output - reference).abs().max().item(), "problems": problems}


def _works(result: dict[str, Any] | None) -> bool:
    return result is not None and "error" not in result and not result["problems"] and result["difference"] <= ATOL


@dataclass
class Reloads:
    saved: dict[str, Saved]
    stock: dict[str, Any]
    patched: dict[str, Any]


@pytest.fixture(scope="module")
def reloads(tmp_path_factory: pytest.TempPathFactory) -> Reloads:
    from transformers import logging as transformers_logging

    root = tmp_path_factory.mktemp("save_reload")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        saved: dict[str, Saved] = {}
        for model_type, support in sorted(AVAILABLE.items()):
            entries = [_save_converted(model_type, root)]
            if _preload_here(support):
                entries.append(_save_built(model_type, root))
            saved.update({entry.key: entry for entry in entries})
        # Every checkpoint goes through stock transformers: a "stock" row must load there, any
        # other must not (else its row should say "stock").
        stock = _load_stock([entry for entry in saved.values() if entry.error is None], root)
        patched = {
            entry.key: _load_patched(entry)
            for entry in saved.values()
            if entry.error is None
            and AVAILABLE[entry.model_type].reload_on(_version()) != RELOAD_STOCK
            and _preload_here(AVAILABLE[entry.model_type])
        }
    finally:
        transformers_logging.set_verbosity(verbosity)
    return Reloads(saved, stock, patched)


def _describe(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not loaded"
    if "error" in result:
        return result["error"]
    return f"max abs difference {result['difference']:.3e}, {result['problems'] or 'no key problems'}"


def _assert_reloads(reloads: Reloads, key: str) -> None:
    saved = reloads.saved[key]
    support = DECLARED[saved.model_type]
    assert saved.error is None, f"{key}: building or saving failed: {saved.error}"
    assert not saved.left_fused, f"{key}: fused blocks left in a model built after replace_fused_blocks"
    assert reloads.stock["__defuser_imported__"] is False, "the stock loader imported defuser"
    stock, patched = reloads.stock.get(key), reloads.patched.get(key)
    way = support.reload_on(_version())  # stock from support.stock_reload_from on
    if way == RELOAD_STOCK:
        assert _works(stock), f"{key}: the table says stock transformers reloads it, but: {_describe(stock)}"
    elif way == RELOAD_PATCHED:
        assert _works(patched), f"{key}: the table says replace_fused_blocks reloads it, but: {_describe(patched)}"
        assert not _works(stock), f"{key}: stock transformers reloads it too: the table should say stock"
    else:
        assert _works(stock) or _works(patched), f"{key}: no reload (stock: {_describe(stock)})"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", _params(list(DECLARED)))
def test_saved_defused_model_reloads(model_type: str, reloads: Reloads) -> None:
    """convert_model -> save_pretrained -> the reload the table states gives the fused outputs."""
    _assert_reloads(reloads, f"converted/{model_type}")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", _params([name for name, support in DECLARED.items() if support.preload]))
def test_model_built_defused_saves_and_reloads(model_type: str, reloads: Reloads) -> None:
    """replace_fused_blocks -> build -> save_pretrained -> the same reload gives its outputs."""
    support = DECLARED[model_type]
    if not _preload_here(support):
        # The table's "(X+)" holds: on older transformers the type is not patched at all.
        assert replace_fused_blocks(model_type) is False
        assert not is_patched(model_type)
        pytest.xfail(f"table: replace_fused_blocks patches it from transformers {support.preload_min_transformers} on")
    _assert_reloads(reloads, f"built/{model_type}")


def _saved_keys(reloads: Reloads, key: str) -> list[str]:
    from safetensors import safe_open

    saved = reloads.saved[key]
    assert saved.error is None, saved.error
    with safe_open(str(saved.folder / "model.safetensors"), "pt") as checkpoint:
        return list(checkpoint.keys())


@pytest.mark.slow
@pytest.mark.subprocess
def test_saved_keys_are_per_expert_under_the_stock_names(reloads: Reloads) -> None:
    """Mixtral's stock mapping merges block_sparse_moe.experts.N.w1/w3/w2: that is what is written."""
    keys = _saved_keys(reloads, "converted/mixtral")
    assert "model.layers.0.block_sparse_moe.experts.7.w1.weight" in keys
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in keys
    assert not [key for key in keys if "gate_up_proj" in key or ".experts.0.gate_proj" in key]
    keys = _saved_keys(reloads, "converted/qwen3_moe")
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert not [key for key in keys if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]


@pytest.mark.slow
@pytest.mark.subprocess
def test_saved_keys_are_fused_where_stock_checkpoints_are(reloads: Reloads) -> None:
    """gpt_oss keeps its experts fused (interleaved, transposed, biased) in checkpoints, GLM-4
    its dense gate_up_proj, JetMoE its stacked input_linear: that is what is written."""
    keys = _saved_keys(reloads, "converted/gpt_oss")
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.experts.gate_up_proj_bias" in keys
    assert not [key for key in keys if ".experts.0." in key]
    keys = _saved_keys(reloads, "converted/glm4")
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not [key for key in keys if "mlp.gate_proj" in key]
    keys = _saved_keys(reloads, "converted/jetmoe")
    assert "model.layers.0.mlp.input_linear.weight" in keys
    assert not [key for key in keys if ".linear.weight" in key and ".input_linear" not in key]


def _available_params(names: list[str]) -> list[Any]:
    return [
        pytest.param(
            name, id=name, marks=[pytest.mark.skip(reason=reason)] if (reason := _unavailable(DECLARED[name])) else []
        )
        for name in sorted(names)
    ]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", _available_params(list(DECLARED)))
def test_defused_save_equals_the_stock_save_of_the_fused_model(model_type: str, reloads: Reloads) -> None:
    """``save_pretrained`` after ``convert_model`` writes the checkpoint stock transformers
    writes for the fused model: the same keys, and tensors equal to the last bit."""
    from safetensors.torch import load_file

    saved = reloads.saved[f"converted/{model_type}"]
    assert saved.error is None, saved.error
    stock = load_file(str(saved.stock_folder / "model.safetensors"))
    defused = load_file(str(saved.folder / "model.safetensors"))
    assert sorted(set(stock) - set(defused))[:4] == [], "keys stock writes and the defused save does not"
    assert sorted(set(defused) - set(stock))[:4] == [], "keys the defused save writes and stock does not"
    unequal = [
        key for key in stock if stock[key].shape != defused[key].shape or not torch.equal(stock[key], defused[key])
    ]
    assert unequal[:4] == [], "tensors that differ from stock's"


# --- the save mapping a converted model carries ---------------------------------------------

_BACK_REFERENCE = re.compile(r"\\(?:\d|g<)")


def _census_types() -> list[str]:
    # The cached names (see tests/test_census.py): collection does not scan transformers.
    from defuser_testkit.census import fused_model_type_names

    return fused_model_type_names(Path(__file__).resolve().parents[1] / ".cache" / "census")


def _defuser_entries(model: nn.Module) -> list[Any]:
    return [entry for entry in model._weight_conversions if type(entry).__module__.startswith("defuser")]


def _patterns(entry: Any) -> list[str]:
    patterns = []
    for name in ("source_patterns", "target_patterns", "_original_source_patterns", "_original_target_patterns"):
        value = getattr(entry, name, None) or []
        patterns += [value] if isinstance(value, str) else list(value)
    return patterns


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _census_types())
def test_save_mapping_has_no_back_references(model_type: str) -> None:
    """The entries convert_model adds to ``model._weight_conversions`` are written like
    transformers' own: no ``\\1`` in any pattern of them or of their reverses, and every
    pattern is both a regex and a replacement template (auto-round reads them both ways)."""
    model = build_tiny_model(model_type)
    if not convert_model(model):
        pytest.skip(f"nothing in {model_type} is defused (its fused dense Linears are kept)")
    entries = _defuser_entries(model)
    assert entries, "convert_model attached no save mapping"
    empty = re.match("", "")
    for entry in entries:
        reverse = entry.reverse_transform()
        for pattern in _patterns(entry) + _patterns(reverse):
            assert not _BACK_REFERENCE.search(pattern), f"{type(entry).__name__}: back-reference in {pattern!r}"
            # auto-round reads each side as a pattern and as a replacement template.
            re.compile(pattern)
            empty.expand(pattern)


@pytest.mark.parametrize("model_type", ["jetmoe", "glm4"])
def test_fused_tensors_written_are_views_where_the_experts_lie_as_fused(model_type: str) -> None:
    """A zero-copy conversion saves without copying: each fused tensor the save writes (stacked
    parallel experts, a dense gate-up) is a view of the model's storage."""
    from transformers.core_model_loading import revert_weight_conversion

    model = build_tiny_model(model_type)
    assert convert_model(model)
    state = model.state_dict()
    storages = {tensor.untyped_storage().data_ptr() for tensor in state.values()}
    written = revert_weight_conversion(model, dict(state))
    fused = {key: tensor for key, tensor in written.items() if key not in state}
    assert fused, "nothing was written fused"
    views = [key for key, tensor in fused.items() if tensor.untyped_storage().data_ptr() in storages]
    assert sorted(views) == sorted(fused), sorted(set(fused) - set(views))


@pytest.mark.parametrize("model_type", ["gpt_oss", "phi3", "mixtral", "qwen3_vl_moe_text", "jetmoe", "dbrx"])
def test_models_loaded_with_from_pretrained_save_as_stock_does(model_type: str, tmp_path: Path) -> None:
    """A model loaded with from_pretrained (patched, or stock then convert_model) carries the
    mapping of its load, not the type's: its save still equals stock's save of the fused model."""
    from safetensors.torch import load_file

    support = DECLARED[model_type]
    if reason := _unavailable(support):
        pytest.skip(reason)
    stock = build_tiny_model(model_type)
    with _without_config_validation(stock):
        stock.save_pretrained(tmp_path / "stock")
    expected = load_file(str(tmp_path / "stock" / "model.safetensors"))
    loaded = {}
    if _preload_here(support):
        with defused_blocks(model_type):
            loaded["patched"] = type(stock).from_pretrained(tmp_path / "stock", config=stock.config)
    loaded["converted"] = type(stock).from_pretrained(tmp_path / "stock", config=stock.config)
    assert convert_model(loaded["converted"])
    for way, model in loaded.items():
        assert find_candidates(model) == [], way
        with _without_config_validation(model):
            model.save_pretrained(tmp_path / way)
        written = load_file(str(tmp_path / way / "model.safetensors"))
        assert sorted(written) == sorted(expected), way
        assert all(torch.equal(written[key], expected[key]) for key in expected), way


class _QuantizedLinear(nn.Linear):
    """Stands for a quantizer's layer: not a plain nn.Linear."""


def test_projections_a_quantizer_replaced_are_saved_per_expert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Experts whose projections are no longer plain Linears keep their per-expert keys, one
    warning names the loader, and replace_fused_blocks loads them back."""
    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model)
    for module in model.modules():
        if isinstance(module, DefusedExperts):
            for expert in module:
                for name, linear in [
                    (name, child) for name, child in expert.named_children() if type(child) is nn.Linear
                ]:
                    replacement = _QuantizedLinear(
                        linear.in_features, linear.out_features, bias=linear.bias is not None
                    )
                    replacement.load_state_dict(linear.state_dict())
                    setattr(expert, name, replacement)
    with caplog.at_level("WARNING", logger="defuser.engine.save"):
        model.save_pretrained(tmp_path / "first")
        model.save_pretrained(tmp_path / "second")
    warnings = [record for record in caplog.records if "replace_fused_blocks" in record.getMessage()]
    assert len(warnings) == 1, [record.getMessage() for record in caplog.records]
    keys = _keys_in(tmp_path / "first")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert not [key for key in keys if key.endswith("experts.gate_up_proj")]
    with defused_blocks("gpt_oss"):
        loaded = type(model).from_pretrained(tmp_path / "first", config=model.config).eval()
    assert (tiny_forward(loaded, inputs) - reference).abs().max().item() <= ATOL


def _keys_in(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as checkpoint:
        return list(checkpoint.keys())


def test_every_declared_type_has_a_reload_row() -> None:
    from defuser.tables import supported_models_markdown

    table = supported_models_markdown()
    for name, support in DECLARED.items():
        assert f"| `{name}` |" in table and reload_cell(support) in table, name


def _configs_within(config: Any) -> list[Any]:
    """``config`` and every sub-config under it."""
    found, pending = [], [config]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(value for value in vars(current).values() if defuser.tiny._is_config(value))
    return found


@pytest.mark.parametrize("model_type", sorted(AVAILABLE))
def test_tiny_config_passes_transformers_validation(model_type: str) -> None:
    # A tiny config transformers refuses cannot be saved, so the save and pre-load tests of
    # its type would test nothing; the shrink rules and the plugins' recipes keep each valid.
    validators = [
        (config, validate)
        for config in _configs_within(defuser.tiny.tiny_config(model_type))
        if callable(validate := getattr(config, "validate", None))
    ]
    if not validators:
        pytest.skip(f"transformers {_version()} configs have no validate()")
    for config, validate in validators:
        try:
            validate()
        except Exception as error:
            pytest.fail(f"the tiny {model_type} config's {type(config).__name__} is refused: {error}")


# --- fused checkpoints into patched models: each module's own layout ------------------------

# Layouts beyond the plain one, each read by the split from the defused module's layout.
FUSED_LAYOUTS = {
    "gpt_oss": "interleaved, transposed, biased gate-up",
    "qwen3_vl_moe_text": "checkpoint experts transposed against the module",
    "longcat_flash": "identity experts' rows in the fused gate-up",
    "dbrx": "flattened, separate gate and up under a child module",
    "llama4_text": "undecorated, transposed",
    "aria_text": "transposed, renamed from fc1/fc2",
    "phi4_multimodal_audio": "dense halves reversed, with biases",
    "inkling2_text": "interleaved checkpoint tensor, reordered by the stock converter first",
    "jetmoe": "parallel experts, gated in the MLP and not in the attention (MoA)",
    "ergo": "not gated, transposed, a subclass with a per-expert norm after each route",
    "granitemoeshared": "5.3.0: parallel experts beside a shared MLP fusing the same name",
}


@pytest.mark.parametrize("model_type", sorted(FUSED_LAYOUTS))
def test_fused_checkpoint_loads_into_patched_model(model_type: str, tmp_path: Path) -> None:
    support = DECLARED[model_type]
    reason = _unavailable(support)
    if reason:
        pytest.skip(reason)
    if not _preload_here(support):
        pytest.skip(f"replace_fused_blocks patches {model_type} from transformers {support.preload_min_transformers}")
    stock = build_tiny_model(model_type)
    inputs = tiny_inputs(stock)
    reference = tiny_forward(stock, inputs)
    folders = {"original format": tmp_path / "original", "in-memory fused": tmp_path / "fused"}
    with _without_config_validation(stock):
        stock.save_pretrained(folders["original format"])
        stock.save_pretrained(folders["in-memory fused"], save_original_format=False)
    with defused_blocks(model_type):
        for name, folder in folders.items():
            loaded = type(stock).from_pretrained(folder, config=stock.config).eval()
            assert find_candidates(loaded) == [], f"{name}: fused blocks after a patched load"
            difference = (tiny_forward(loaded, inputs) - reference).abs().max().item()
            assert difference <= ATOL, f"{model_type}, {name} checkpoint ({FUSED_LAYOUTS[model_type]}): {difference}"


# --- undoing replace_fused_blocks -----------------------------------------------------------


def _experts_class(model: nn.Module) -> type:
    return type(model.model.layers[0].mlp.experts)


def _mapping_repr(key: str) -> str:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return repr(get_checkpoint_conversion_mapping(key))


def _defuser_registrations() -> list[str]:
    from transformers.monkey_patching import get_patch_mapping

    return [
        name
        for name, value in get_patch_mapping().items()
        if "defuser" in getattr(value, "__module__", "") or hasattr(value, "_defuser_original")
    ]


def test_restore_fused_blocks_builds_and_loads_stock_again(tmp_path: Path) -> None:
    module = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe")
    stock_class, stock_mapping = module.Qwen3MoeExperts, _mapping_repr("qwen3_moe")
    stock = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(stock)
    reference = tiny_forward(stock, inputs)
    stock.save_pretrained(tmp_path)
    assert replace_fused_blocks("qwen3_moe") is True
    assert replace_fused_blocks("qwen3_moe") is True  # twice is harmless
    assert issubclass(_experts_class(build_tiny_model("qwen3_moe")), DefusedExperts)
    assert _mapping_repr("qwen3_moe") != stock_mapping and module.Qwen3MoeExperts is not stock_class
    assert restore_fused_blocks("qwen3_moe") == ["qwen3_moe"]
    assert restore_fused_blocks("qwen3_moe") == [], "restoring twice is harmless"
    assert module.Qwen3MoeExperts is stock_class
    assert _mapping_repr("qwen3_moe") == stock_mapping
    assert _defuser_registrations() == []
    assert _experts_class(build_tiny_model("qwen3_moe")) is stock_class
    loaded = type(stock).from_pretrained(tmp_path).eval()
    assert _experts_class(loaded) is stock_class and len(find_candidates(loaded)) == 2
    assert (tiny_forward(loaded, inputs) - reference).abs().max().item() <= ATOL


def test_restore_fused_blocks_without_a_type_restores_every_one() -> None:
    assert replace_fused_blocks("qwen3_moe") and replace_fused_blocks("mixtral")
    assert sorted(restore_fused_blocks()) == ["mixtral", "qwen3_moe"]
    assert not is_patched("qwen3_moe") and not is_patched("mixtral")
    assert restore_fused_blocks() == []
    assert not issubclass(_experts_class(build_tiny_model("mixtral")), DefusedExperts)


def test_defused_blocks_nests_and_repeats() -> None:
    for _ in range(2):
        with defused_blocks("qwen3_moe") as patched:
            assert patched is True
            with defused_blocks("qwen3_moe", "mixtral") as inner:
                assert inner is True
                assert issubclass(_experts_class(build_tiny_model("mixtral")), DefusedExperts)
            # the inner block undid mixtral, which it patched, but not qwen3_moe, which it found patched
            assert is_patched("qwen3_moe") and not is_patched("mixtral")
            assert issubclass(_experts_class(build_tiny_model("qwen3_moe")), DefusedExperts)
        assert not is_patched("qwen3_moe")
        assert not issubclass(_experts_class(build_tiny_model("qwen3_moe")), DefusedExperts)


def test_defused_blocks_keeps_a_patch_made_before_it() -> None:
    assert replace_fused_blocks("qwen3_moe") is True
    with defused_blocks("qwen3_moe"):
        pass
    assert is_patched("qwen3_moe")
    assert issubclass(_experts_class(build_tiny_model("qwen3_moe")), DefusedExperts)
    assert restore_fused_blocks("qwen3_moe") == ["qwen3_moe"]


def test_defused_blocks_restores_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="inside"), defused_blocks("qwen3_moe"):
        raise RuntimeError("inside")
    assert not is_patched("qwen3_moe")
    assert not issubclass(_experts_class(build_tiny_model("qwen3_moe")), DefusedExperts)


def test_restore_keeps_classes_another_patched_type_shares() -> None:
    # Both types are built from the classes of one modeling module.
    text = "qwen3_vl_moe_text"
    assert replace_fused_blocks("qwen3_vl_moe") and replace_fused_blocks(text)
    assert restore_fused_blocks("qwen3_vl_moe") == ["qwen3_vl_moe"]
    assert find_candidates(build_tiny_model(text)) == [], "restoring one type unpatched the other's classes"
    assert restore_fused_blocks(text) == [text]
    assert find_candidates(build_tiny_model(text)), "the last restore left the classes patched"


def test_undo_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="model type"):
        restore_fused_blocks(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one"), defused_blocks():
        pass
    with pytest.raises(TypeError, match="model type strings"), defused_blocks(""):
        pass


def test_restore_gives_parallel_experts_models_their_own_post_init_back() -> None:
    from transformers import PreTrainedModel

    module = importlib.import_module("transformers.models.jetmoe.modeling_jetmoe")
    root = module.JetMoePreTrainedModel
    assert "post_init" not in root.__dict__
    with defused_blocks("jetmoe"):
        assert "post_init" in root.__dict__
        patched = build_tiny_model("jetmoe")
        assert find_candidates(patched) == []
        gated = patched.model.layers[0].mlp.input_linear
        assert [name for name, _ in gated[0].named_children()] == ["linear"]
        assert isinstance(patched.model.layers[0].self_attention.experts.input_linear[0].linear, nn.Linear)
    assert "post_init" not in root.__dict__ and root.post_init is PreTrainedModel.post_init
    assert len(find_candidates(build_tiny_model("jetmoe"))) == 8
