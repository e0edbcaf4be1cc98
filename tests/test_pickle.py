"""Pickling a defused model: ``pickle`` / ``torch.save`` of the whole module, and ``copy.deepcopy``.

The classes defuser makes at run time (defused experts, split dense MLPs, the classes
``replace_fused_blocks`` installs) are not module attributes; their instances must still
pickle, load again (in this process and in a fresh one that converted nothing) as the same
defused model giving the same outputs, and fuse back.  A class that cannot be rebuilt on load
is a clear error naming it.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from defuser import convert_model, defused_blocks, fuse_model
from defuser.engine.dense import split_class_for, split_dense_layout
from defuser.engine.experts import DefusedExperts, defused_class_for
from defuser.engine.parallel import DefusedParallelExperts
from defuser.tiny import build_tiny_model, tiny_config, tiny_forward, tiny_inputs

ATOL = 1e-5

# One type per kind of generated class: experts (plain; transposed with biases and the fused
# class's own gate), split dense MLPs, and parallel experts.
CONVERTED_TYPES = ["qwen3_moe", "gpt_oss", "phi3", "glm4", "granitemoe", "jetmoe"]
# Built defused from the start: the classes replace_fused_blocks installs.
PRELOAD_TYPES = ["qwen3_moe", "gpt_oss", "phi3"]


@pytest.fixture(autouse=True)
def _undo_patches(defuser_restore_patches: None) -> None:
    """Every replace_fused_blocks a test makes is undone after it."""


def defused_parts(model: nn.Module) -> list[str]:
    """``path:class`` of every defused part of ``model`` (experts, parallel experts, split MLPs)."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, DefusedExperts):
            assert all(isinstance(expert.up_proj, nn.Linear) for expert in module), path
        if isinstance(module, DefusedExperts | DefusedParallelExperts) or split_dense_layout(module) is not None:
            found.append(f"{path}:{type(module).__name__}")
    return found


def _converted(model_type: str) -> tuple[nn.Module, dict, torch.Tensor]:
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model)
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    return model, inputs, reference


def _built_defused(model_type: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _check_same_model(back: nn.Module, model: nn.Module, inputs: dict, reference: torch.Tensor) -> None:
    assert back is not model
    parts = defused_parts(model)
    assert parts and defused_parts(back) == parts
    assert (tiny_forward(back, inputs) - reference).abs().max().item() <= ATOL
    assert fuse_model(back)
    assert defused_parts(back) == []
    assert (tiny_forward(back, inputs) - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("model_type", CONVERTED_TYPES)
def test_converted_model_pickles_and_loads_as_the_same_defused_model(model_type: str) -> None:
    model, inputs, reference = _converted(model_type)
    back = pickle.loads(pickle.dumps(model))
    # The generated classes come back as the very classes a conversion makes here.
    for (path, module), (_, loaded) in zip(model.named_modules(), back.named_modules(), strict=True):
        assert type(loaded) is type(module), path
    _check_same_model(back, model, inputs, reference)
    # The original is untouched by pickling it.
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "phi3", "jetmoe"])
def test_torch_save_of_whole_converted_model_loads_again(model_type: str) -> None:
    model, inputs, reference = _converted(model_type)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _check_same_model(torch.load(buffer, weights_only=False), model, inputs, reference)


@pytest.mark.parametrize("model_type", CONVERTED_TYPES)
def test_deepcopy_keeps_the_classes_and_outputs(model_type: str) -> None:
    model, inputs, reference = _converted(model_type)
    twin = copy.deepcopy(model)
    for (path, module), (_, copied) in zip(model.named_modules(), twin.named_modules(), strict=True):
        assert type(copied) is type(module), path
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    _check_same_model(twin, model, inputs, reference)


def test_experts_held_for_expert_parallel_load_as_held_experts() -> None:
    from defuser.engine.sharded import HeldExperts, hold_experts

    model, _, _ = _converted("qwen3_moe")
    experts = hold_experts(model.model.layers[0].mlp.experts, first=2, count=3)
    for loaded in (pickle.loads(pickle.dumps(experts)), copy.deepcopy(experts)):
        assert type(loaded) is type(experts) and isinstance(loaded, HeldExperts)
        assert loaded.first_expert == 2 and list(loaded.expert_ids) == [2, 3, 4]
        assert sorted(loaded.state_dict()) == sorted(experts.state_dict())
        hidden = torch.randn(4, model.config.hidden_size)
        assert torch.equal(loaded[1](hidden), experts[1](hidden))


@pytest.mark.parametrize("model_type", ["gpt_oss", "phi3"])
def test_shallow_copy_of_a_defused_module_is_the_same_module(model_type: str) -> None:
    model, _, _ = _converted(model_type)
    mlp = model.model.layers[0].mlp
    module = getattr(mlp, "experts", mlp)
    twin = copy.copy(module)
    assert type(twin) is type(module) and twin is not module
    assert vars(twin).keys() == vars(module).keys()
    assert all(vars(twin)[name] is value for name, value in vars(module).items())
    hidden = torch.randn(5, model.config.hidden_size)
    if isinstance(module, DefusedExperts):
        gate = module[0].act_fn
        gate_twin = copy.copy(gate)
        assert gate_twin._gate_fn is gate._gate_fn is not None
        up = module[0].up_proj(hidden)
        assert torch.equal(gate_twin(up, up), gate(up, up))
    else:
        assert torch.equal(twin(hidden), module(hidden))


@pytest.mark.parametrize("model_type", PRELOAD_TYPES)
def test_model_built_defused_pickles_inside_and_after_the_patch(model_type: str) -> None:
    with defused_blocks(model_type):
        model = _built_defused(model_type)
        inside = pickle.dumps(model)
        twin = copy.deepcopy(model)
        loaded_inside = pickle.loads(inside)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert (tiny_forward(twin, inputs) - reference).abs().max().item() <= ATOL
    after = pickle.dumps(model)
    for data in (inside, after):
        back = pickle.loads(data)
        # Loaded as the class the factories make for the stock class, not the patch's own.
        for module in back.modules():
            if isinstance(module, DefusedExperts):
                assert type(module) is defused_class_for(module.fused_class)
            elif split_dense_layout(module) is not None:
                assert type(module) is split_class_for(type(module))
        _check_same_model(back, model, inputs, reference)
    _check_same_model(loaded_inside, model, inputs, reference)


def test_missing_stock_class_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _converted("qwen3_moe")
    data = pickle.dumps(model)
    modeling = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe")
    monkeypatch.delattr(modeling, "Qwen3MoeExperts")
    with pytest.raises(pickle.UnpicklingError, match=r"modeling_qwen3_moe\.Qwen3MoeExperts"):
        pickle.loads(data)


def test_missing_split_stock_class_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _converted("phi3")
    data = pickle.dumps(model)
    modeling = importlib.import_module("transformers.models.phi3.modeling_phi3")
    monkeypatch.delattr(modeling, "Phi3MLP")
    with pytest.raises(pickle.UnpicklingError, match=r"modeling_phi3\.Phi3MLP"):
        pickle.loads(data)


_FRESH_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    import defuser
    from defuser import fuse_model
    from defuser.engine.preload import is_patched
    from defuser.tiny import tiny_forward
    sys.path.insert(0, sys.argv[2])
    from test_pickle import defused_parts

    results = {}
    for entry in json.loads(sys.argv[1]):
        model = torch.load(entry["model"], weights_only=False)
        saved = torch.load(entry["io"], weights_only=False)
        first = (tiny_forward(model, saved["inputs"]) - saved["reference"]).abs().max().item()
        parts = defused_parts(model)
        fused = fuse_model(model)
        second = (tiny_forward(model, saved["inputs"]) - saved["reference"]).abs().max().item()
        results[entry["name"]] = {
            "parts": parts, "error": first, "fused": fused, "fused_error": second, "left": defused_parts(model)
        }
    results["patched"] = any(is_patched(name) for name in ("qwen3_moe", "gpt_oss", "phi3"))
    print(json.dumps(results))
    """
)


@pytest.mark.subprocess
def test_whole_model_files_load_in_a_fresh_process(tmp_path: Path) -> None:
    entries, expected = [], {}

    def save(name: str, model: nn.Module, inputs: dict, reference: torch.Tensor) -> None:
        torch.save(model, tmp_path / f"{name}.pt")
        torch.save({"inputs": inputs, "reference": reference}, tmp_path / f"{name}.io.pt")
        entries.append({"name": name, "model": str(tmp_path / f"{name}.pt"), "io": str(tmp_path / f"{name}.io.pt")})
        expected[name] = defused_parts(model)

    for model_type in CONVERTED_TYPES:
        model, inputs, reference = _converted(model_type)
        save(model_type, model, inputs, reference)
    for model_type in PRELOAD_TYPES:
        with defused_blocks(model_type):
            model = _built_defused(model_type)
            inputs = tiny_inputs(model)
            save(f"{model_type}-built-defused", model, inputs, tiny_forward(model, inputs))

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, json.dumps(entries), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results.pop("patched") is False  # nothing was converted or patched in that process
    for name, parts in expected.items():
        result = results[name]
        assert parts and result["parts"] == parts, name
        assert result["error"] <= ATOL, name
        assert result["fused"] and result["left"] == [] and result["fused_error"] <= ATOL, name
