"""The census: every model type of the installed transformers that carries fused experts or a
fused ``gate_up_proj`` is defused with equal outputs and every tensor but the fused ones kept,
by a plugin or by the generic engine, has its README table row, and is fused back by
``fuse_model`` to the very same classes and tensors.

The list is not frozen: :mod:`defuser_testkit.census` scans transformers' sources at test
time, so a fused class that transformers adds or renames fails here, by name, until a plugin
(or the generic engine) handles it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from defuser import convert_model, fuse_model
from defuser.api import find_candidates
from defuser.engine.dense import split_dense_layout
from defuser.engine.selfcheck import consumed_names
from defuser.plugin_info import DENSE_KEPT, DENSE_SPLIT
from defuser.plugins import get_plugin_manager
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs
from defuser_testkit.census import (
    FusedClass,
    built_or_derived,
    fused_model_type_names,
    fused_model_types,
    scan_fused_classes,
)
from defuser_testkit.checks import assert_no_fused_names

ATOL = 1e-5
# Collection needs only the names: they come from a list cached per transformers install (in
# the git-ignored .cache/), so collecting does not parse every modeling file.  The tests below
# run the scan itself, and test_cached_type_names_match_the_scan holds the two equal.
TYPE_NAMES = fused_model_type_names(Path(__file__).resolve().parents[1] / ".cache" / "census")


@functools.cache
def _census() -> tuple[list[FusedClass], dict[str, set[FusedClass]]]:
    """Every fused class of the installed transformers, and the model types that hold them."""
    classes = scan_fused_classes()
    return classes, fused_model_types(classes)


def _fused_classes_of(model_type: str) -> set[FusedClass]:
    types = _census()[1]
    if model_type not in types:
        pytest.fail(f"{model_type}: in the cached census list but not in the scan (a stale .cache/census?)")
    return types[model_type]


def _fused_paths(model: nn.Module, names: set[str]) -> list[str]:
    return [path for path, module in model.named_modules() if type(module).__name__ in names]


def _split_dense_classes() -> set[str]:
    """Dense MLP classes some plugin declares split (every other fused gate-up Linear is kept)."""
    manager = get_plugin_manager()
    manager.ensure_loaded()
    return {name for plugin in manager.plugins.values() for name in getattr(plugin.obj, "dense_classes", None) or {}}


def _still_fused(module: nn.Module) -> bool:
    """True while ``module`` holds fused weights (stacked tensors or a gate-up Linear)."""
    stacked = any(t.ndim >= 3 for t in module.parameters(recurse=False))
    flattened = "Expert" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))
    return stacked or flattened or isinstance(module._modules.get("gate_up_proj"), nn.Linear)


def _tensor_names(model: nn.Module) -> set[str]:
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return names | {name for name, _ in model.named_buffers(remove_duplicate=False)}


@functools.cache
def _meta_classes(model_type: str) -> frozenset[str]:
    with torch.device("meta"):
        model = build_tiny_model(model_type)
    return frozenset(type(module).__name__ for module in model.modules())


@pytest.mark.slow
def test_cached_type_names_match_the_scan() -> None:
    """The names the per-type tests were collected for are the scan's, no more, no fewer."""
    assert TYPE_NAMES == sorted(_census()[1])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPE_NAMES)
def test_model_type_defuses_with_equal_outputs(model_type: str) -> None:
    fused_classes = _fused_classes_of(model_type)
    names = {fused.name for fused in fused_classes}
    try:
        model = build_tiny_model(model_type)
    except Exception as error:
        pytest.fail(f"{model_type}: no tiny model ({type(error).__name__}: {error})")
    fused = _fused_paths(model, names)
    if not fused:
        pytest.skip(f"{model_type}: shares a package with fused classes but its model holds none")
    # A fused dense gate-up Linear is split only where a plugin declares its class; elsewhere it
    # stays the one nn.Linear it is (ModelCloud's Defuser and GPTQModel expect it there).
    dense_names = {fused.name for fused in fused_classes if fused.kind == "fused_dense_mlp"}
    split_names = _split_dense_classes()
    kept = [path for path in fused if type(model.get_submodule(path)).__name__ in dense_names - split_names]
    split = [path for path in fused if type(model.get_submodule(path)).__name__ in dense_names & split_names]
    _check_dense_claim(model_type, model, fused, dense_names, split_names)
    fused = [path for path in fused if path not in kept]
    names -= dense_names - split_names
    if not fused:
        assert convert_model(model) is False, (
            f"{model_type}: converted although only kept dense MLPs hold fused weights"
        )
        assert all(isinstance(model.get_submodule(path).gate_up_proj, nn.Linear) for path in kept)
        return
    candidates = find_candidates(model)
    covered = [c.path for c in candidates]
    unclaimed = [
        f"{path} ({type(module).__name__})"
        for path, module in model.named_modules()
        if path in fused and not any(path == c or path.startswith(f"{c}.") for c in covered)
    ]
    assert not unclaimed, f"{model_type}: fused modules no plugin or generic engine handles: {unclaimed}"
    owner = get_plugin_manager().owner_of(model_type)
    assert owner is not None or all(c.generic for c in candidates), f"{model_type}: unclaimed and not generic"
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    classes = [type(module) for module in model.modules()]
    consumed = {f"{c.path}.{name}" for c in candidates for name in consumed_names(c)}
    kept_tensors = {name for name in _tensor_names(model) if name not in consumed}
    assert convert_model(model) is True
    # Every tensor but the fused ones the layouts consume is still there, same name, same values.
    lost = sorted(kept_tensors - _tensor_names(model))
    assert not lost, f"{model_type}: tensors lost in conversion: {lost[:5]}"
    converted = model.state_dict()
    changed = [name for name in kept_tensors & original.keys() if not torch.equal(converted[name], original[name])]
    assert not changed, f"{model_type}: tensors changed in conversion: {changed[:5]}"
    left = [f"{path} ({type(m).__name__})" for path, m in model.named_modules() if _still_fused(m)]
    left = [entry for entry in left if entry.split(" (")[1][:-1] in names]
    assert not left, f"{model_type}: still fused after conversion: {left}"
    # Defused means defused: no fused name answers on what replaced each candidate.
    assert_no_fused_names(model, candidates)
    for path in kept:
        assert isinstance(model.get_submodule(path)._modules.get("gate_up_proj"), nn.Linear), f"{path} was split"
    for path in split:
        assert split_dense_layout(model.get_submodule(path)) is not None, f"{path} was not split"
    difference = (tiny_forward(model, inputs) - reference).abs().max().item()
    assert difference <= ATOL, f"{model_type}: outputs differ by {difference}"

    # And back: fuse_model restores the fused classes and tensors (names, order, values) and
    # the result defuses again with equal outputs.
    assert fuse_model(model) is True
    assert [type(module) for module in model.modules()] == classes, f"{model_type}: classes not restored"
    restored = model.state_dict()
    assert list(restored) == list(original), f"{model_type}: state-dict names differ after fuse_model"
    changed = [name for name, tensor in original.items() if not torch.equal(restored[name], tensor)]
    assert not changed, f"{model_type}: fused tensors differ after fuse_model: {changed[:5]}"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    assert convert_model(model) is True
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    # The README table says what is supported: every type defused here has its row.
    assert f"| `{model_type}` |" in _table(), (
        f"{model_type}: defused, but not in the README table (declare it in its plugin, or in "
        "defuser.engine.generic.TESTED_TYPES when the generic engine alone handles it)"
    )


@functools.cache
def _table() -> str:
    from defuser.tables import supported_models_markdown

    return supported_models_markdown()


def _check_dense_claim(
    model_type: str, model: nn.Module, fused: list[str], dense_names: set[str], split_names: set[str]
) -> None:
    """The README's dense column (``TypeSupport.dense``) says what happens to this type's dense
    MLPs with a fused gate-up Linear (split or kept) where the tiny model holds one.  (A tiny
    model may leave out a part, such as dots3_note's audio tower, that a claim covers.)"""
    manager = get_plugin_manager()
    owner = manager.owner_of(model_type)
    support = manager.plugins[owner].info.support_for(model_type) if owner else None
    classes = {type(model.get_submodule(path)).__name__ for path in fused} & dense_names
    if not classes:
        return
    expected = DENSE_SPLIT if classes & split_names else DENSE_KEPT
    claimed = support.dense if support is not None else DENSE_KEPT
    assert claimed == expected, f"{model_type}: TypeSupport.dense is {claimed!r}, the model says {expected!r}"


@pytest.mark.slow
def test_every_fused_class_is_built_by_some_model_type() -> None:
    """A fused class that no tiny model contains would escape the census: name it."""
    classes, types = _census()
    seen: set[str] = set()
    for model_type in sorted(types):
        try:
            seen |= _meta_classes(model_type)
        except Exception:  # reported by the per-type test
            continue
    missing = sorted(f"{fused.package}.{fused.name}" for fused in classes if not built_or_derived(fused, seen, classes))
    assert not missing, f"fused classes no model type builds, itself or through a subclass: {missing}"


# Decorated families with layouts beyond the plain one: the generic engine alone (no plugin
# installed) must defuse them exactly from the decorator's flags and the class's own gate.
GENERIC_ONLY = [
    "qwen3_moe",  # plain concatenated SwiGLU
    "beam",  # float32 gate math
    "glm5_next",  # clamped SwiGLU, no act_fn
    "minimax_m3_vl_text",  # clamped (up + 1) GLU, plus dense fused shared MLPs
    "nemotron_h",  # not gated
    "muse_spark_text",  # post-expert norm
    "inkling2_text",  # softcapped SwiGLU module in float32
    "aria_text",  # transposed
    "openai_privacy_filter",  # transposed, biased, clamped GLU
]


@pytest.mark.parametrize("model_type", GENERIC_ONLY)
def test_generic_engine_alone(model_type: str, defuser_plugin_manager, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"model type {model_type!r} does not exist in this transformers")
    model = build_tiny_model(model_type)
    decorated = [m for m in model.modules() if isinstance(getattr(m, "has_gate", None), bool)]
    if not decorated:
        pytest.skip(f"{model_type}: experts not decorated in this transformers (a plugin declares them)")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    with caplog.at_level("INFO", logger="defuser"):
        assert convert_model(model) is True
    assert "handled generically" in caplog.text
    assert find_candidates(model) == []
    difference = (tiny_forward(model, inputs) - reference).abs().max().item()
    assert difference <= ATOL, f"{model_type}: outputs differ by {difference}"


def test_type_names_are_scanned_once_per_install_and_a_bad_cache_is_rescanned(tmp_path, monkeypatch) -> None:
    from defuser_testkit import census

    scans = []

    def scan() -> dict[str, set[FusedClass]]:
        scans.append(1)
        return {"zeta_moe": set(), "alpha_moe": set()}

    monkeypatch.setattr(census, "fused_model_types", scan)
    assert fused_model_type_names(tmp_path) == ["alpha_moe", "zeta_moe"]
    assert fused_model_type_names(tmp_path) == ["alpha_moe", "zeta_moe"]
    assert len(scans) == 1
    (written,) = tmp_path.iterdir()
    written.write_text('{"not": "a list"}', encoding="utf-8")
    assert fused_model_type_names(tmp_path) == ["alpha_moe", "zeta_moe"]
    assert len(scans) == 2
    # Another transformers (here: another version string) gets a list of its own.
    monkeypatch.setattr("transformers.__version__", "0.0.0")
    assert fused_model_type_names(tmp_path) == ["alpha_moe", "zeta_moe"]
    assert len(scans) == 3 and len(list(tmp_path.iterdir())) == 2


def test_type_names_come_back_where_the_cache_cannot_be_written(tmp_path, monkeypatch, caplog) -> None:
    from defuser_testkit import census

    monkeypatch.setattr(census, "fused_model_types", lambda: {"alpha_moe": set()})
    blocked = tmp_path / "a_file"
    blocked.write_text("", encoding="utf-8")
    assert fused_model_type_names(blocked / "census") == ["alpha_moe"]
    assert "cannot write the census cache" in caplog.text


def test_class_headers_read_without_parsing_agree_with_the_parser_or_give_way() -> None:
    import ast

    from defuser_testkit.census import _base_names, _class_headers

    source = (
        "class Plain:\n    pass\n"
        "class Dotted(nn.Module, Generic[T], metaclass=Meta):\n    x = 1\n"
        "class Split(\n    FooExperts,\n    mixins.Bar,\n):\n    def f(self):\n        class Inner(X): ...\n"
    )
    parsed = [(node.name, _base_names(node)) for node in ast.parse(source).body if isinstance(node, ast.ClassDef)]
    assert (
        _class_headers(source)
        == parsed
        == [
            ("Plain", []),
            ("Dotted", ["Module"]),
            ("Split", ["FooExperts", "Bar"]),
        ]
    )
    # A header the pattern cannot read (parentheses two levels deep) sends the file to the parser.
    assert _class_headers("class Odd(make(base(1))):\n    pass\n") is None
