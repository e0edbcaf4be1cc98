"""Every module path GPTQModel's definitions quantize exists in the defused model, as the plain
``nn.Linear`` GPTQModel replaces, for every model type a defuser plugin claims.

GPTQModel walks a ``module_tree`` per family and quantizes exactly the paths it names (written
against ModelCloud's Defuser); a path it does not find is skipped silently by definitions that
are not strict, so a naming difference would leave experts unquantized without an error.  The
expected paths are data derived from GPTQModel's definitions by ``scripts/gptqmodel_paths.py``
(tests/data/gptqmodel_paths.json, with the GPTQModel version it was read from).

A path missing here fails the test when the stock model has it as a Linear (defuser split or
renamed it) or when it lies inside a module defuser converted (defuser named it differently).
A path the stock model lacks too, outside anything converted, belongs to a structure this
transformers release or the tiny config does not build (granite's parallel experts after 5.3,
dense layers a tiny config leaves out): not defuser's to provide, and listed in the skip reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from torch import nn

from defuser import convert_model
from defuser.api import find_candidates
from defuser.tiny import build_tiny_model

DATA = json.loads((Path(__file__).parent / "data" / "gptqmodel_paths.json").read_text(encoding="utf-8"))
PLACEHOLDER = "{expert_index}"


def _resolve(root: nn.Module, path: str) -> object | None:
    owner: object = root
    for part in path.split("."):
        if isinstance(owner, nn.Module) and part in owner._modules:
            owner = owner._modules[part]
        else:
            owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def _present(layer: nn.Module, path: str, quantized: bool) -> bool:
    """``path`` resolves in ``layer`` (every expert index, for a per-expert path), to an
    ``nn.Linear`` when GPTQModel quantizes it."""
    if PLACEHOLDER in path:
        prefix, _, rest = path.partition(f".{PLACEHOLDER}.")
        container = _resolve(layer, prefix)
        count = len(container) if isinstance(container, nn.Module) and hasattr(container, "__len__") else 0
        return count > 0 and all(_present(layer, f"{prefix}.{index}.{rest}", quantized) for index in range(count))
    found = _resolve(layer, path)
    return isinstance(found, nn.Linear) if quantized else found is not None


def _layers(model: nn.Module, node: str) -> list[nn.Module]:
    container = _resolve(model, node)
    return list(container) if isinstance(container, nn.ModuleList) else []


def _stock_parent_converted(stock_layers: list[nn.Module], path: str, converted_classes: set[str]) -> bool:
    """True when ``path`` lies inside (or is) a module of a class defuser converted, in the stock model."""
    parts = path.replace(f".{PLACEHOLDER}", "").split(".")
    for depth in range(len(parts), 0, -1):
        for layer in stock_layers:
            found = _resolve(layer, ".".join(parts[:depth]))
            if isinstance(found, nn.Module) and type(found).__name__ in converted_classes:
                return True
    return False


def _tiny_as_loaded(model_type: str, loader: str | None) -> nn.Module:
    """The tiny model built with the Auto class GPTQModel loads it with (the default one where
    that class does not take this config)."""
    import transformers

    auto = getattr(transformers, loader, None) if loader else None
    if auto is not None:
        try:
            return build_tiny_model(model_type, model_class=auto.from_config)
        except ValueError:  # the loader's Auto class has no entry for this config
            pass
    return build_tiny_model(model_type)


# The projections defuser gives an experts module (and ModelCloud's Defuser too): a per-expert
# path GPTQModel names otherwise inside a converted module was written for another structure.
_DEFUSED_LEAVES = {"gate_proj", "up_proj", "down_proj", "linear", "identity"}


@pytest.mark.parametrize("model_type", sorted(DATA["definitions"]))
def test_gptqmodel_definition_paths_resolve_to_linears(model_type: str) -> None:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"model type {model_type!r} does not exist in this transformers")
    definition = DATA["definitions"][model_type]
    model = _tiny_as_loaded(model_type, definition.get("loader"))
    stock = copy.deepcopy(model)
    converted_classes = {candidate.class_name for candidate in find_candidates(model)}
    convert_model(model)
    missing, structural = [], []
    for node in definition["layers"]:
        layers, stock_layers = _layers(model, node), _layers(stock, node)
        if not layers:
            structural.append(f"{node} (no layers there)")
            continue
        for entry in definition["modules"]:
            path, quantized = entry["path"], entry["quantized"]
            if any(_present(layer, path, quantized) for layer in layers):
                continue
            in_stock = any(_present(layer, path, quantized) for layer in stock_layers)
            inside = _stock_parent_converted(stock_layers, path, converted_classes)
            other_names = PLACEHOLDER in path and path.rsplit(".", 1)[-1] not in _DEFUSED_LEAVES
            if in_stock or (inside and not other_names):
                missing.append(f"{node}.#.{path}")
            else:
                structural.append(f"{node}.#.{path}")
    gptqmodel = f"GPTQModel {DATA['gptqmodel']} {definition['definition']}"
    assert not missing, f"{model_type}: paths {gptqmodel} quantizes are missing after convert_model: {missing}"
    if structural:
        pytest.skip(f"{model_type}: {gptqmodel} names paths this tiny stock model does not build: {structural}")
