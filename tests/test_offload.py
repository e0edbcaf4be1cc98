"""convert_model on models dispatched with accelerate: layers on the CPU, on disk, in a RAM store.

Each tiny model is saved, loaded back with a ``device_map`` (or dispatched with accelerate),
converted in place, and compared with the undispatched model: outputs equal, experts of
offloaded layers on ``meta`` with working hooks and their own entries in the offload store,
experts of the other layers on their fused tensor's device.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("accelerate")

import accelerate.utils
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import attach_align_device_hook_on_blocks
from accelerate.utils import (
    OffloadedWeightsLoader,
    extract_submodules_state_dict,
    offload_state_dict,
)
from transformers import AutoModelForCausalLM

from defuser import convert_model, fuse_model
from defuser.api import ConversionError
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5
OFFLOADED = "model.layers.1"


def _device_map(model: torch.nn.Module, offloaded: str = "disk") -> dict[str, str]:
    """Everything on the CPU but decoder layer 1, which goes to ``offloaded``."""
    device_map = {name: "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map = {f"model.{name}": device for name, device in device_map.items()}
    device_map.update({"model.layers.0": "cpu", OFFLOADED: offloaded, "lm_head": "cpu"})
    return device_map


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``model_type -> (folder, inputs, reference output, reference defused state dict)``."""
    cache = {}

    def make(model_type: str):
        if model_type not in cache:
            model = build_tiny_model(model_type)
            folder = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(folder)
            inputs = tiny_inputs(model)
            reference = tiny_forward(model, inputs)
            assert convert_model(model)
            cache[model_type] = (folder, inputs, reference, model.state_dict())
        return cache[model_type]

    return make


def _offloaded_linears(model: torch.nn.Module, layer: str = OFFLOADED):
    """``(full name, nn.Linear)`` of the projections defusion made under ``layer`` (a dense
    MLP's ``down_proj`` was never fused)."""
    found = []
    for name, module in model.get_submodule(layer).mlp.named_modules():
        new = name.endswith(("gate_proj", "up_proj")) or name.startswith("experts.")
        if isinstance(module, torch.nn.Linear) and new:
            found.append((f"{layer}.mlp.{name}", module))
    return found


def _forward_through_new_linears(model: torch.nn.Module, inputs) -> torch.Tensor:
    """``tiny_forward``, checking that the defused projections of both layers ran (not the
    fused modules they replaced)."""
    calls = {"model.layers.0": 0, OFFLOADED: 0}

    def count(layer: str):
        return lambda *_: calls.__setitem__(layer, calls[layer] + 1)

    handles = [
        linear.register_forward_hook(count(layer)) for layer in calls for _, linear in _offloaded_linears(model, layer)
    ]
    try:
        output = tiny_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert all(calls.values()), calls
    return output


def _fused_names(model: torch.nn.Module) -> list[str]:
    return [name for name in model.state_dict() if name.endswith(("gate_up_proj", "gate_up_proj.weight"))]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "phi3"])
def test_from_pretrained_cpu_and_disk(model_type, saved, tmp_path):
    folder, inputs, reference, defused_state = saved(model_type)
    offload_folder = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model(model_type)), offload_folder=str(offload_folder)
    )
    on_cpu = model.model.layers[0].mlp
    fused_on_cpu = {name: tensor for name, tensor in on_cpu.named_parameters() if "gate_up_proj" in name}
    assert fused_on_cpu and all(tensor.device.type == "cpu" for tensor in fused_on_cpu.values())

    assert convert_model(model)

    assert not _fused_names(model)
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)
    # Layer 0 stayed on its device: every new weight lies where its fused tensor lay.
    for name, linear in _offloaded_linears(model, "model.layers.0"):
        assert linear.weight.device == next(iter(fused_on_cpu.values())).device, name
    # Layer 1 is offloaded: meta weights, one offload hook per Linear, one file per tensor.
    linears = _offloaded_linears(model)
    assert len(linears) >= 2
    for name, linear in linears:
        assert linear.weight.device.type == "meta", name
        hook = linear._hf_hook
        assert hook.offload and hook.weights_map.prefix == f"{name}."
        for tensor_name, _ in linear.named_parameters():
            full_name = f"{name}.{tensor_name}"
            torch.testing.assert_close(hook.weights_map[tensor_name], defused_state[full_name], atol=0, rtol=0)
            assert (offload_folder / f"{full_name}.dat").is_file(), full_name
    # The hook loads the weights for a forward and puts them back on meta afterwards.
    name, linear = linears[0]
    hidden = torch.randn(3, linear.in_features)
    expected = torch.nn.functional.linear(hidden, defused_state[f"{name}.weight"], defused_state.get(f"{name}.bias"))
    torch.testing.assert_close(linear(hidden), expected, atol=ATOL, rtol=0)
    assert linear.weight.device.type == "meta"


def test_views_stay_views_on_the_device(saved, tmp_path):
    folder, inputs, reference, _ = saved("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model("qwen3_moe")), offload_folder=str(tmp_path)
    )
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    start, size = fused.untyped_storage().data_ptr(), fused.untyped_storage().nbytes()

    assert convert_model(model)

    gate = model.model.layers[0].mlp.experts[5].gate_proj.weight
    assert gate.device == fused.device
    assert start <= gate.data_ptr() < start + size  # a view of the fused storage, not a copy
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)


def test_cleanup_then_save_keeps_every_expert(saved, tmp_path):
    folder, inputs, reference, _ = saved("qwen3_moe")
    offload_folder = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model("qwen3_moe")), offload_folder=str(offload_folder)
    )
    resaved = offload_folder / f"{OFFLOADED}.mlp.experts.gate_up_proj.safetensors"
    assert resaved.is_file()  # transformers wrote the fused tensor it built while loading

    assert convert_model(model, cleanup_original=True)

    assert not resaved.exists()  # cleanup_original: the fused entry's own file is gone
    assert (folder / "model.safetensors").is_file()  # the checkpoint itself is never touched
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(tiny_forward(reloaded, inputs), reference, atol=ATOL, rtol=0)


def _dispatched(model_type: str, offload_dir, **kwargs):
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    dispatch_model(model, _device_map(model), offload_dir=str(offload_dir), **kwargs)
    return model, inputs, reference


def _index(folder) -> dict:
    return json.loads((folder / "index.json").read_text())


def test_dispatch_model_disk_index_and_cleanup(tmp_path):
    model, inputs, reference = _dispatched("qwen3_moe", tmp_path)
    fused_key = f"{OFFLOADED}.mlp.experts.gate_up_proj"
    assert fused_key in _index(tmp_path)

    assert convert_model(model, cleanup_original=True)

    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)
    index = _index(tmp_path)
    names = [f"{name}.weight" for name, _ in _offloaded_linears(model)]
    assert len(names) == 24 and all(name in index for name in names)
    assert all((tmp_path / f"{name}.dat").is_file() for name in names)
    # cleanup_original: the fused entries and their files are gone from the offload folder.
    assert fused_key not in index and not (tmp_path / f"{fused_key}.dat").exists()
    loader = model.model.layers[1].mlp.experts[0].gate_proj._hf_hook.weights_map.dataset
    assert isinstance(loader, OffloadedWeightsLoader) and fused_key not in loader.index


def test_block_wide_offload_hook(tmp_path):
    model, inputs, reference = _dispatched("qwen3_moe", tmp_path, preload_module_classes=["Qwen3MoeDecoderLayer"])
    block_hook = model.model.layers[1]._hf_hook
    assert block_hook.offload and block_hook.place_submodules

    assert convert_model(model)

    # The block's own hook now loads the per-expert entries by name; no hook below it.
    for name, linear in _offloaded_linears(model):
        assert linear.weight.device.type == "meta" and not hasattr(linear, "_hf_hook"), name
        assert name + ".weight" in _index(tmp_path)
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)


def test_cpu_ram_offload_store_holds_views(saved):
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    cpu_offload(model, execution_device=torch.device("cpu"))
    store = model.model.layers[1].mlp.experts._hf_hook.weights_map.dataset
    fused = store[f"{OFFLOADED}.mlp.experts.gate_up_proj"]

    assert convert_model(model)

    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)
    gate = store[f"{OFFLOADED}.mlp.experts.2.gate_proj.weight"]
    assert gate.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # zero-copy in the RAM store
    torch.testing.assert_close(gate, fused[2, : gate.shape[0]], atol=0, rtol=0)
    assert model.model.layers[1].mlp.experts[2].gate_proj.weight.device.type == "meta"


def test_ram_and_disk_offload_in_one_store(tmp_path):
    """What dispatch_model builds on an accelerator machine for "cpu" and "disk" entries: one
    loader holding some layers in memory and others in its offload folder."""
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    state = model.state_dict()
    offload_state_dict(str(tmp_path), extract_submodules_state_dict(state, ["model.layers.0"]))
    loader = OffloadedWeightsLoader(state_dict=extract_submodules_state_dict(state, [OFFLOADED]), save_folder=tmp_path)
    device_map = _device_map(model)
    cpu = torch.device("cpu")
    attach_align_device_hook_on_blocks(
        model,
        execution_device={"": cpu, **dict.fromkeys(device_map, cpu)},
        offload={name: name in ("model.layers.0", OFFLOADED) for name in device_map},
        weights_map=loader,
    )
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    fused_in_memory = loader.state_dict[f"{OFFLOADED}.mlp.experts.gate_up_proj"]

    assert convert_model(model)

    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)
    in_memory = loader.state_dict[f"{OFFLOADED}.mlp.experts.7.up_proj.weight"]
    assert in_memory.untyped_storage().data_ptr() == fused_in_memory.untyped_storage().data_ptr()
    assert not (tmp_path / f"{OFFLOADED}.mlp.experts.7.up_proj.weight.dat").exists()
    for name, linear in _offloaded_linears(model, "model.layers.0"):
        assert linear.weight.device.type == "meta" and (tmp_path / f"{name}.weight.dat").is_file(), name
        assert f"{name}.weight" in loader.index and f"{name}.weight" not in loader.state_dict


def test_failure_leaves_module_and_store_as_they_were(saved, tmp_path, monkeypatch):
    folder, inputs, reference, _ = saved("qwen3_moe")
    offload_folder = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model("qwen3_moe")), offload_folder=str(offload_folder)
    )
    fused = model.model.layers[1].mlp.experts
    fused_hook = fused._hf_hook
    loader = fused_hook.weights_map.dataset
    files_before = sorted(os.listdir(offload_folder))
    index_before, keys_before = dict(loader.index), list(loader.all_keys)
    original = accelerate.utils.offload_weight
    calls = []

    def failing_offload_weight(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 5:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(accelerate.utils, "offload_weight", failing_offload_weight)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.experts .*disk full"):
        convert_model(model)
    assert len(calls) == 5

    assert model.model.layers[1].mlp.experts is fused and fused._hf_hook is fused_hook
    assert fused.gate_up_proj.device.type == "meta"
    assert sorted(os.listdir(offload_folder)) == files_before
    assert loader.index == index_before and loader.all_keys == keys_before
    torch.testing.assert_close(tiny_forward(model, inputs), reference, atol=ATOL, rtol=0)

    monkeypatch.setattr(accelerate.utils, "offload_weight", original)
    assert convert_model(model)
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)


# --- fuse_model on dispatched models ------------------------------------------------------


def _store_of(linear: torch.nn.Module):
    return linear._hf_hook.weights_map.dataset


def _edit_one_projection(model: torch.nn.Module) -> None:
    """An edit made on the defused form (pruning, calibration): one up projection of each
    layer, on the device (layer 0) and in the offload store (layer 1, as a tool writing
    offloaded weights does)."""
    name, linear = next((n, lin) for n, lin in _offloaded_linears(model, "model.layers.0") if n.endswith("up_proj"))
    with torch.no_grad():
        linear.weight.mul_(-2.0)
    name, linear = next((n, lin) for n, lin in _offloaded_linears(model) if n.endswith("up_proj"))
    store = _store_of(linear)
    key = f"{name}.weight"
    store.state_dict[key] = store[key] * -2.0


_STOCK_SAVES: dict[str, bool] = {}


def _stock_saves_offloaded(folder, model_type: str, scratch) -> bool:
    """Whether transformers saves this model type, loaded with layer 1 on disk, without defuser
    (5.3.0 cannot for qwen3_moe and mixtral: its reverse weight conversion runs before the
    offloaded tensors are loaded, on names the model does not have)."""
    if model_type not in _STOCK_SAVES:
        stock = AutoModelForCausalLM.from_pretrained(
            folder, device_map=_device_map(build_tiny_model(model_type)), offload_folder=str(scratch / "offload")
        )
        try:
            stock.save_pretrained(scratch / "saved")
            _STOCK_SAVES[model_type] = True
        except AttributeError:
            _STOCK_SAVES[model_type] = False
    return _STOCK_SAVES[model_type]


def _fused_module(model: torch.nn.Module, model_type: str, layer: str = OFFLOADED) -> torch.nn.Module:
    mlp = model.get_submodule(layer).mlp
    return mlp if model_type == "phi3" else mlp.experts


@pytest.mark.parametrize("cleanup_original", [True, False], ids=["cleanup", "no-cleanup"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral", "phi3"])
def test_fuse_model_rebuilds_offloaded_fused_tensors(model_type, cleanup_original, saved, tmp_path):
    folder, inputs, reference, _ = saved(model_type)
    offload_folder = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model(model_type)), offload_folder=str(offload_folder)
    )
    fused_class = type(_fused_module(model, model_type))
    assert convert_model(model, cleanup_original=cleanup_original)
    _edit_one_projection(model)
    edited = tiny_forward(model, inputs)
    assert (edited - reference).abs().max().item() > 1e-3, "the edit changes the output"
    defused_names = [name for name, _ in _offloaded_linears(model)]
    per_expert = [f"{name}.weight" for name in defused_names]
    loader = _store_of(_offloaded_linears(model)[0][1])

    assert fuse_model(model)

    fused = _fused_module(model, model_type)
    assert type(fused) is fused_class and not set(defused_names) & set(dict(model.named_modules()))
    # The fused tensors are back in the offload store, on meta in the model, behind an offload hook.
    holder = fused.gate_up_proj if model_type == "phi3" else fused
    hook = holder._hf_hook
    assert hook.offload and hook.weights_map.dataset is loader
    for name, tensor in holder.named_parameters(recurse=False):
        key = hook.weights_map.prefix + name
        assert tensor.device.type == "meta" and (key in loader.index or key in loader.state_dict), key
    # The per-expert entries left the store, with their files.
    assert not any(key in loader.index or key in loader.state_dict for key in per_expert)
    assert not any((offload_folder / f"{key}.dat").exists() for key in per_expert)
    assert (folder / "model.safetensors").is_file()  # the checkpoint itself is never touched
    assert not list(offload_folder.glob("*.defuser-previous")), "replaced entries leave nothing behind"
    torch.testing.assert_close(tiny_forward(model, inputs), edited, atol=ATOL, rtol=0)

    if _stock_saves_offloaded(folder, model_type, tmp_path / "stock"):
        model.save_pretrained(tmp_path / "saved")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        torch.testing.assert_close(tiny_forward(reloaded, inputs), edited, atol=ATOL, rtol=0)
    assert convert_model(model, cleanup_original=cleanup_original), "and it defuses again"
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), edited, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type, fused_tensors", [("qwen3_moe", 2), ("gpt_oss", 4)])
def test_a_failed_fuse_leaves_the_defused_module_and_the_store_as_they_were(
    model_type, fused_tensors, saved, tmp_path, monkeypatch
):
    """The last fused tensor's write fails: the ones written are removed, the stale fused
    entries they replaced (qwen3_moe: files of their own that transformers wrote while
    loading) are put back."""
    from defuser.engine.fuse_back import FusionError

    folder, inputs, reference, _ = saved(model_type)
    offload_folder = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=_device_map(build_tiny_model(model_type)), offload_folder=str(offload_folder)
    )
    assert convert_model(model)  # the fused entries stay: fusing back replaces them
    defused = model.model.layers[1].mlp.experts
    linears = {name: (linear, linear._hf_hook) for name, linear in _offloaded_linears(model)}
    loader = _store_of(next(iter(linears.values()))[0])
    files_before = sorted(os.listdir(offload_folder))
    index_before, keys_before = dict(loader.index), list(loader.all_keys)
    original = accelerate.utils.offload_weight
    calls = []

    def failing_offload_weight(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == fused_tensors:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(accelerate.utils, "offload_weight", failing_offload_weight)
    with pytest.raises(FusionError, match=r"fusing model\.layers\.1\.mlp\.experts \(Defused\w+\) back .*disk full"):
        fuse_model(model, filter=[r"layers\.1\."])
    assert len(calls) == fused_tensors

    assert model.model.layers[1].mlp.experts is defused
    assert {name: (linear, linear._hf_hook) for name, linear in _offloaded_linears(model)} == linears
    assert all(linear.weight.device.type == "meta" for linear, _ in linears.values())
    assert sorted(os.listdir(offload_folder)) == files_before
    assert loader.index == index_before and sorted(loader.all_keys) == sorted(keys_before)
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)

    monkeypatch.setattr(accelerate.utils, "offload_weight", original)
    assert fuse_model(model)
    torch.testing.assert_close(tiny_forward(model, inputs), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("store", ["block-wide-hook", "ram"])
def test_fuse_model_with_a_block_wide_hook_or_a_ram_store(store, tmp_path):
    if store == "ram":
        model = build_tiny_model("gpt_oss")
        inputs = tiny_inputs(model)
        reference = tiny_forward(model, inputs)
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        model, inputs, reference = _dispatched("gpt_oss", tmp_path, preload_module_classes=["GptOssDecoderLayer"])
    assert convert_model(model, cleanup_original=True)
    assert fuse_model(model)
    experts = model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "GptOssExperts" and experts.gate_up_proj.device.type == "meta"
    torch.testing.assert_close(tiny_forward(model, inputs), reference, atol=ATOL, rtol=0)
    assert convert_model(model, cleanup_original=True)
    torch.testing.assert_close(_forward_through_new_linears(model, inputs), reference, atol=ATOL, rtol=0)
