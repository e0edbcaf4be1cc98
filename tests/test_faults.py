"""Faults and bad input: transactional conversion, idempotence, threads, and the bad-input table.

A plugin's defuse hook that changes the fused module and then raises (a bug, or running out
of memory half-way) must leave that module exactly as it was: the same object at the same
path, the same parameter objects holding the same tensors, the same forward.  Modules
converted before it stay converted and the model still runs.

``docs/bad-inputs.md`` holds a table of bad inputs and what each gets; it is generated from
:data:`BAD_INPUTS` by running them (``python tests/test_faults.py`` rewrites it) and a test
keeps it true.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import defuser.plugins as plugins
from defuser import PluginInfo, convert_model, fuse_model, hookimpl, replace_fused_blocks
from defuser.api import ConversionError, find_candidates
from defuser.engine.dense import split_dense_mlp
from defuser.engine.experts import DefusedExperts
from defuser.engine.preload import restore_preload_patches
from defuser.plugins import DefuserPluginManager, PluginError
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ROOT = Path(__file__).resolve().parents[1]
BAD_INPUTS_DOC = ROOT / "docs" / "bad-inputs.md"
ATOL = 1e-5
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", RuntimeError)


@pytest.fixture(autouse=True)
def _restore_patches(defuser_restore_patches):
    yield


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> DefuserPluginManager:
    """A fresh process-wide manager with every installed plugin, for one test."""
    fresh = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", fresh)
    return fresh


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@dataclass
class _Before:
    """What a module looked like: objects (identity), their data objects and their values."""

    module: nn.Module
    children: dict[str, nn.Module]
    tensors: dict[str, torch.Tensor]
    data_pointers: dict[str, int]
    values: dict[str, torch.Tensor]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, module: nn.Module) -> _Before:
        tensors = _tensors(module)
        return cls(
            module=module,
            children=dict(module.named_modules()),
            tensors=tensors,
            data_pointers={name: tensor.data_ptr() for name, tensor in tensors.items()},
            values={name: tensor.detach().clone() for name, tensor in tensors.items()},
            attributes={k: v for k, v in vars(module).items() if not k.startswith("_")},
        )

    def assert_same(self, module: nn.Module) -> None:
        assert module is self.module, "a different object now stands at the failed path"
        assert dict(module.named_modules()).keys() == self.children.keys()
        for name, child in module.named_modules():
            assert child is self.children[name], f"child {name!r} was replaced"
        tensors = _tensors(module)
        assert tensors.keys() == self.tensors.keys()
        for name, tensor in tensors.items():
            assert tensor is self.tensors[name], f"{name} is another Parameter/buffer object"
            assert tensor.data_ptr() == self.data_pointers[name], f"{name} holds another tensor"
            assert torch.equal(tensor, self.values[name]), f"{name} changed values"
        assert {k: v for k, v in vars(module).items() if not k.startswith("_")} == self.attributes


def _routed_inputs(experts: nn.Module, hidden: int, tokens: int = 6) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:2] for _ in range(tokens)])
    return torch.randn(tokens, hidden, generator=generator), index, torch.rand(tokens, 2, generator=generator)


class _MeddleThenFail:
    """Wins qwen3_moe; on its target module it changes everything it can, then raises."""

    def __init__(self, target: str, error: BaseException):
        self.target = target
        self.error = error

    @hookimpl
    def defuser_plugin_info(self) -> PluginInfo:
        from defuser import TypeSupport

        return PluginInfo(name="meddler", model_types=(TypeSupport("qwen3_moe"),), priority=10)

    @hookimpl
    def defuser_defuse_candidate(self, candidate):
        if candidate.path != self.target:
            return None  # the generic engine converts the others
        fused = candidate.module
        fused.act_fn = nn.Identity()  # replace a child
        fused.gate_up_proj.data = torch.zeros_like(fused.gate_up_proj.data)  # swap a parameter's tensor
        fused.down_proj = nn.Parameter(torch.ones_like(fused.down_proj))  # replace a parameter object
        del fused.num_experts  # delete an attribute
        fused.register_buffer("scratch", torch.zeros(3))  # add a buffer
        fused.half_done = True  # add an attribute
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("plugin bug"),
        OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    ],
    ids=["plugin-bug", "torch-out-of-memory", "cuda-oom-runtime-error"],
)
def test_a_meddling_hook_that_raises_leaves_the_module_exactly_as_it_was(manager, error):
    target = "model.layers.1.mlp.experts"
    manager.register(_MeddleThenFail(target, error), "meddler")
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.get_submodule(target)
    before = _Before.of(fused)
    routed = _routed_inputs(fused, model.config.hidden_size)
    with torch.no_grad():
        fused_output = fused(*routed)
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert message.startswith(f"defusing {target} (Qwen3MoeExperts) failed: plugin 'meddler': ")
    assert "hook defuser_defuse_candidate raised" in message and str(error) in message
    assert isinstance(caught.value.__cause__, PluginError) and caught.value.__cause__.__cause__ is error
    before.assert_same(model.get_submodule(target))
    with torch.no_grad():
        assert torch.equal(model.get_submodule(target)(*routed), fused_output)
    assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts), "converted before the failure"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_a_dense_mlp_split_in_place_then_failing_is_put_back(manager):
    class SplitThenFail:
        @hookimpl
        def defuser_plugin_info(self):
            from defuser import TypeSupport

            return PluginInfo(name="split_then_fail", model_types=(TypeSupport("glm4"),), priority=10)

        @hookimpl
        def defuser_defuse_candidate(self, candidate):
            if candidate.path == "model.layers.1.mlp":
                split_dense_mlp(candidate.module, candidate.layout)  # changes the module in place
                raise OUT_OF_MEMORY("out of memory after splitting")
            return None

    manager.register(SplitThenFail(), "split_then_fail")
    model = build_tiny_model("glm4")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    mlp = model.model.layers[1].mlp
    before = _Before.of(mlp)
    keys = list(model.state_dict())
    with pytest.raises(ConversionError, match=r"defusing model\.layers\.1\.mlp \(Glm4MLP\) failed: .*split_then_fail"):
        convert_model(model)
    before.assert_same(model.model.layers[1].mlp)
    assert isinstance(mlp.gate_up_proj, nn.Linear) and "gate_proj" not in mlp._modules
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear), "layer 0 was converted before"
    state = model.state_dict()
    assert [k for k in state if ".layers.1." in k] == [k for k in keys if ".layers.1." in k]
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_running_out_of_memory_inside_the_engine_mid_module(manager, monkeypatch):
    import defuser.engine.experts as experts_module

    real_linear_from = experts_module.linear_from
    calls = {"count": 0}

    def fails_on_the_second_module(weight, bias, *requires_grad):
        calls["count"] += 1
        if calls["count"] == 8 * 3 + 6:  # 8 experts x 3 Linears, then the 6th of the second module
            raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 64.00 MiB")
        return real_linear_from(weight, bias, *requires_grad)

    monkeypatch.setattr(experts_module, "linear_from", fails_on_the_second_module)
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    second = model.model.layers[1].mlp.experts
    before = _Before.of(second)
    expected = (
        r"defusing model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\) failed: plugin 'generic': "
        rf"hook defuser_defuse_candidate raised {OUT_OF_MEMORY.__name__}: CUDA out of memory"
    )
    with pytest.raises(ConversionError, match=expected):
        convert_model(model)
    before.assert_same(model.model.layers[1].mlp.experts)
    assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts)
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    monkeypatch.setattr(experts_module, "linear_from", real_linear_from)
    assert convert_model(model) is True, "with memory back, the rest converts"
    assert find_candidates(model) == []
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


@pytest.fixture
def copy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused tensors cannot be re-laid out in place (as when torch cannot tell who else holds
    their storage): cleanup_original copies and releases them instead."""
    import defuser.engine.inplace as inplace_module

    monkeypatch.setattr(inplace_module, "_storage_references", lambda tensor: None)


def test_cleanup_original_releases_each_copied_fused_weight_before_the_next_copy(monkeypatch, copy_path):
    """gpt-oss copies (transposed, interleaved): with cleanup_original the fused gate-up is
    gone before the down projection is copied, so one fused tensor's copy exists at a time."""
    import defuser.engine.layout as layout_module

    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[0].mlp.experts
    seen = []
    real_dense_per_expert = layout_module.dense_per_expert

    def watching(stack):
        seen.append(dict(fused._parameters))
        return real_dense_per_expert(stack)

    monkeypatch.setattr(layout_module, "dense_per_expert", watching)
    assert convert_model(model, max_layers=1, cleanup_original=True)
    # split_gate_up copies gate-up in one pass; the first dense_per_expert call copies down.
    assert seen and seen[0]["gate_up_proj"] is None and seen[0]["down_proj"] is not None
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_a_failure_after_a_fused_weight_was_released_rebuilds_it_equal(monkeypatch, copy_path):
    import defuser.engine.experts as experts_module

    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[0].mlp.experts
    values = {name: tensor.detach().clone() for name, tensor in fused.named_parameters()}
    strides = {name: tensor.stride() for name, tensor in fused.named_parameters()}
    grads = {name: tensor.requires_grad for name, tensor in fused.named_parameters()}

    def out_of_memory(weight, bias, *requires_grad):
        assert fused._parameters["gate_up_proj"] is None, "released before the Linears are built"
        raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(experts_module, "linear_from", out_of_memory)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.experts"):
        convert_model(model, cleanup_original=True)
    assert model.model.layers[0].mlp.experts is fused
    restored = dict(fused.named_parameters())
    assert restored.keys() == values.keys()
    for name, value in values.items():
        assert torch.equal(restored[name], value), name
        assert restored[name].stride() == strides[name], name
        assert restored[name].requires_grad == grads[name], name
    assert (tiny_forward(model, inputs) - reference).abs().max().item() == 0


def test_cleanup_original_keeps_a_tied_fused_weight(monkeypatch):
    model = build_tiny_model("gpt_oss")
    first, second = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    second.gate_up_proj = first.gate_up_proj  # tied: the other layer still needs it
    tied = first.gate_up_proj
    assert convert_model(model, max_layers=1, cleanup_original=True)
    assert second.gate_up_proj is tied and tied.numel() > 0


def test_an_interrupt_mid_module_propagates_as_it_is_and_restores(manager):
    target = "model.layers.0.mlp.experts"
    manager.register(_MeddleThenFail(target, KeyboardInterrupt()), "meddler")
    model = build_tiny_model("qwen3_moe")
    before = _Before.of(model.get_submodule(target))
    with pytest.raises(KeyboardInterrupt):
        convert_model(model)
    before.assert_same(model.get_submodule(target))
    assert len(find_candidates(model)) == 2


# --- idempotence ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4", "jetmoe", "gpt_oss"])
def test_a_second_conversion_changes_nothing(model_type):
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    assert convert_model(model) is True
    modules = dict(model.named_modules())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    output = tiny_forward(model, inputs)
    assert convert_model(model) is False
    assert convert_model(model, max_layers=1, filter=["+:layers"]) is False
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in model.named_modules())
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == tensors.keys() and all(after[name] is tensors[name] for name in after)
    assert torch.equal(tiny_forward(model, inputs), output)


def test_replace_fused_blocks_twice_is_harmless():
    stock = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(stock)
    assert replace_fused_blocks("qwen3_moe") is True
    assert replace_fused_blocks("qwen3_moe") is True
    built = build_tiny_model("qwen3_moe")
    assert find_candidates(built) == [] and isinstance(built.model.layers[0].mlp.experts, DefusedExperts)
    assert convert_model(built) is False, "a model built defused has nothing left to convert"
    assert restore_preload_patches("qwen3_moe") == ["qwen3_moe"]
    assert restore_preload_patches("qwen3_moe") == []
    again = build_tiny_model("qwen3_moe")
    assert len(find_candidates(again)) == 2, "one restore undoes both patches"
    assert torch.equal(tiny_forward(again, inputs), tiny_forward(stock, inputs))


# --- threads ----------------------------------------------------------------------------


def test_conversions_from_several_threads_at_once(monkeypatch):
    # A manager not loaded yet: the threads also race to load the plugins.
    monkeypatch.setattr(plugins, "_manager", None)
    model_types = ["qwen3_moe", "mixtral", "glm4", "gpt_oss", "qwen3_moe", "jetmoe"]
    models = [build_tiny_model(model_type, seed=seed) for seed, model_type in enumerate(model_types)]
    inputs = [tiny_inputs(model) for model in models]
    references = [tiny_forward(model, batch) for model, batch in zip(models, inputs, strict=True)]
    start = threading.Barrier(len(models))

    def convert(model: nn.Module) -> bool:
        start.wait(timeout=60)
        return convert_model(model)

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        results = list(pool.map(convert, models))
    assert results == [True] * len(models)
    for model_type, model, batch, reference in zip(model_types, models, inputs, references, strict=True):
        assert find_candidates(model) == [], f"{model_type}: fused modules left"
        difference = (tiny_forward(model, batch) - reference).abs().max().item()
        assert difference <= ATOL, f"{model_type}: outputs differ by {difference}"


# --- the bad-input table ------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """One bad input: how it is written, how to try it on a fresh tiny qwen3_moe model, and
    the text an error must contain to name the offending value (None: no error expected)."""

    written: str
    attempt: Callable[[nn.Module], Any]
    names: str | None = None
    # Makes the fresh model the bad input (before "the model" is recorded), when the call alone does not.
    prepare: Callable[[nn.Module], None] | None = None


class _ExplodingDefuse:
    @hookimpl
    def defuser_plugin_info(self):
        from defuser import TypeSupport

        return PluginInfo(name="exploding", model_types=(TypeSupport("qwen3_moe"),), priority=10)

    @hookimpl
    def defuser_defuse_candidate(self, candidate):
        raise RuntimeError("bug in the plugin")


class _NeedsNewerCore:
    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="newer", core=">=2.0")


@contextlib.contextmanager
def _isolated_manager() -> Iterator[DefuserPluginManager]:
    previous = plugins._manager
    plugins._manager = DefuserPluginManager()
    try:
        yield plugins._manager
    finally:
        plugins._manager = previous


def _with_plugin(plugin: Any, name: str, call: Callable[[], Any]) -> Any:
    with _isolated_manager() as manager:
        manager.register(plugin, name)
        return call()


def _with_old_transformers(call: Callable[[], Any]) -> Any:
    from packaging.version import Version

    import defuser.compat as compat

    real = compat.transformers_version
    compat.transformers_version = lambda: Version("5.2.0")
    try:
        return call()
    finally:
        compat.transformers_version = real


def _plugin_status(plugin: Any, name: str) -> str:
    with _isolated_manager() as manager:
        return f"skipped, status: {manager.register(plugin, name).error}"


def _overriding_forward(model: nn.Module) -> None:
    """Give the experts a subclass that overrides the decorated forward (as ergo's ErgoExperts
    does), with no plugin describing it."""
    base = type(model.model.layers[0].mlp.experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return base.forward(self, hidden_states, top_k_index, top_k_weights * 2)

    subclass = type("RescaledExperts", (base,), {"forward": forward})
    for layer in model.model.layers:
        layer.mlp.experts.__class__ = subclass


def _undescribed_tensor(model: nn.Module) -> None:
    """Give the experts a buffer the decorator's flags do not name (a quantisation scale)."""
    for layer in model.model.layers:
        layer.mlp.experts.register_buffer("gate_up_proj_scale", torch.ones(8))


def _swapped_layout() -> Any:
    from defuser import TypeSupport
    from defuser.family import Family

    swap = {"Qwen3MoeExperts": {"gate_first": False}}
    return Family("swapped", [TypeSupport("qwen3_moe")], layout_overrides=swap, priority=10)


def _with_verify(value: str, call: Callable[[], Any]) -> Any:
    import os

    previous = os.environ.get("DEFUSER_VERIFY")
    os.environ["DEFUSER_VERIFY"] = value
    try:
        return call()
    finally:
        if previous is None:
            del os.environ["DEFUSER_VERIFY"]
        else:
            os.environ["DEFUSER_VERIFY"] = previous


# --- hooks, training state and offload (issue 17) ------------------------------------------


def _user_hook(name: str, result: Any = None) -> Callable[..., Any]:
    """A hook function named as a user's would be (the table must read the same whichever
    way this file is run)."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        return result

    hook.__qualname__ = hook.__name__ = name
    hook.__module__ = "user"
    return hook


def _experts0(model: nn.Module) -> nn.Module:
    return model.model.layers[0].mlp.experts


def _convert_with_forward_hooks(model: nn.Module) -> str:
    calls: list[str] = []
    _experts0(model).register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    _experts0(model).register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    result = convert_model(model)
    tiny_forward(model, tiny_inputs(model))
    return f"returns `{result!r}`; both hooks then run on the replacement: {', '.join(calls)}"


def _convert_with_hook_on_dense_gate_up() -> Any:
    model = build_tiny_model("phi3")
    model.model.layers[0].mlp.gate_up_proj.register_forward_hook(_user_hook("capture_activations"))
    return convert_model(model)


def _convert_with_frozen_down(model: nn.Module) -> str:
    _experts0(model).down_proj.requires_grad_(False)
    result = convert_model(model)
    flags = {
        projection: sorted({getattr(expert, projection).weight.requires_grad for expert in _experts0(model)})
        for projection in ("gate_proj", "up_proj", "down_proj")
    }
    return f"returns `{result!r}`; per-expert requires_grad of layer 0: {flags}"


def _fuse_with(change: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    def attempt(model: nn.Module) -> Any:
        convert_model(model)
        change(_experts0(model))
        return fuse_model(model)

    return attempt


def _convert_with_an_optimizer_made_before(model: nn.Module) -> str:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = convert_model(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    per_expert = [p for name, p in model.named_parameters() if ".experts." in name]
    known = sum(id(p) in held for p in per_expert)
    return (
        f"returns `{result!r}`; the optimizer holds {known} of the {len(per_expert)} per-expert parameters "
        "(it keeps the fused ones): create optimizers after converting"
    )


def _fuse_offloaded_after_cleanup() -> str:
    import tempfile

    from transformers import AutoModelForCausalLM

    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
        device_map.update({"model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"})
        loaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=f"{folder}/offload")
        convert_model(loaded, cleanup_original=True)
        result = fuse_model(loaded)
        same = torch.equal(tiny_forward(loaded, inputs), reference)
        loaded.save_pretrained(f"{folder}/saved")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{folder}/saved")
        saved_same = torch.equal(tiny_forward(reloaded, inputs), reference)
    return (
        f"returns `{result!r}`; the fused tensors are rebuilt into the offload store: forward equal to before: "
        f"{same}, saved and reloaded equal: {saved_same}"
    )


BAD_INPUTS = [
    BadInput('convert_model("model")', lambda model: convert_model("model"), "'model'"),
    BadInput("convert_model(None)", lambda model: convert_model(None), "None"),
    BadInput('convert_model(model, filter="layers")', lambda model: convert_model(model, filter="layers"), "'layers'"),
    BadInput("convert_model(model, filter=[3])", lambda model: convert_model(model, filter=[3]), "3"),
    BadInput('convert_model(model, filter=["+:("])', lambda model: convert_model(model, filter=["+:("]), "'+:('"),
    BadInput('convert_model(model, filter=["-:"])', lambda model: convert_model(model, filter=["-:"]), "'-:'"),
    BadInput("convert_model(model, max_layers=0)", lambda model: convert_model(model, max_layers=0), "0"),
    BadInput("convert_model(model, max_layers=-1)", lambda model: convert_model(model, max_layers=-1), "-1"),
    BadInput('convert_model(model, max_layers="2")', lambda model: convert_model(model, max_layers="2"), "'2'"),
    BadInput("convert_model(model, max_layers=1.5)", lambda model: convert_model(model, max_layers=1.5), "1.5"),
    BadInput("convert_model(model, max_layers=True)", lambda model: convert_model(model, max_layers=True), "True"),
    BadInput(
        'convert_model(model, filter=["-:experts"]) (only an exclusion: selects nothing)',
        lambda model: convert_model(model, filter=["-:experts"]),
    ),
    BadInput("convert_model(llama_model) (nothing fused)", lambda model: convert_model(build_tiny_model("llama"))),
    BadInput("replace_fused_blocks(None)", lambda model: replace_fused_blocks(None), "None"),
    BadInput('replace_fused_blocks("")', lambda model: replace_fused_blocks(""), "''"),
    BadInput('replace_fused_blocks("no_such_type")', lambda model: replace_fused_blocks("no_such_type")),
    BadInput('replace_fused_blocks("llama") (nothing to patch)', lambda model: replace_fused_blocks("llama")),
    BadInput(
        "convert_model(model) with transformers 5.2.0 installed",
        lambda model: _with_old_transformers(lambda: convert_model(model)),
    ),
    BadInput(
        "convert_model(model) while a plugin's defuse hook raises",
        lambda model: _with_plugin(_ExplodingDefuse(), "exploding", lambda: convert_model(model)),
        "model.layers.0.mlp.experts",
    ),
    BadInput(
        'a plugin declaring core=">=2.0"',
        lambda model: _plugin_status(_NeedsNewerCore(), "newer"),
        "'newer'",
    ),
    BadInput(
        "convert_model(model) whose experts subclass overrides the decorated forward (no plugin describes it)",
        convert_model,
        "model.layers.0.mlp.experts, model.layers.1.mlp.experts (RescaledExperts",
        prepare=_overriding_forward,
    ),
    BadInput(
        "convert_model(model) whose experts hold a tensor their decorator's flags do not name",
        convert_model,
        "gate_up_proj_scale",
        prepare=_undescribed_tensor,
    ),
    BadInput(
        "convert_model(model) with a plugin declaring gate and up swapped",
        lambda model: _with_plugin(_swapped_layout(), "swapped", lambda: convert_model(model)),
        "model.layers.0.mlp.experts (Qwen3MoeExperts)",
    ),
    BadInput(
        "convert_model(model) with DEFUSER_VERIFY=sometimes",
        lambda model: _with_verify("sometimes", lambda: convert_model(model)),
        "'sometimes'",
    ),
    BadInput(
        "convert_model(model) with a forward hook and a forward pre-hook on model.layers.0.mlp.experts",
        _convert_with_forward_hooks,
    ),
    BadInput(
        "convert_model(phi3_model) with a forward hook on model.layers.0.mlp.gate_up_proj (split in two)",
        lambda model: _convert_with_hook_on_dense_gate_up(),
        "model.layers.0.mlp.gate_up_proj has forward hooks (user.capture_activations)",
    ),
    BadInput(
        "convert_model(model) with experts.gate_up_proj.register_hook(...) (a gradient hook on a fused tensor)",
        lambda model: (_experts0(model).gate_up_proj.register_hook(_user_hook("clip_grad")), convert_model(model)),
        "model.layers.0.mlp.experts.gate_up_proj has gradient hooks register_hook (user.clip_grad)",
    ),
    BadInput(
        "convert_model(model) with a state-dict hook on model.layers.0.mlp.experts",
        lambda model: (_experts0(model).register_state_dict_post_hook(_user_hook("rename_keys")), convert_model(model)),
        "model.layers.0.mlp.experts has state-dict hooks (user.rename_keys)",
    ),
    BadInput(
        "convert_model(model) with experts.register_backward_hook(...) (old-style, not full)",
        lambda model: (_experts0(model).register_backward_hook(_user_hook("log_grad")), convert_model(model)),
        "register_backward_hook hooks (user.log_grad)",
    ),
    BadInput("convert_model(model) after experts.down_proj.requires_grad_(False)", _convert_with_frozen_down),
    BadInput(
        "fuse_model(model) after one expert's up_proj.weight.requires_grad_(False)",
        _fuse_with(lambda experts: experts[3].up_proj.weight.requires_grad_(False)),
    ),
    BadInput(
        "fuse_model(model) with a forward hook on a per-expert Linear",
        _fuse_with(lambda experts: experts[2].down_proj.register_forward_hook(_user_hook("calibrate"))),
    ),
    BadInput(
        "fuse_model(gpt_oss_model) with layer 1 offloaded to disk, converted with cleanup_original=True",
        lambda model: _fuse_offloaded_after_cleanup(),
    ),
    BadInput("convert_model(model) with an optimizer created before", _convert_with_an_optimizer_made_before),
]

# Figures a self-check measures: their last digits depend on the machine's kernels.
_MEASURED = re.compile(r"(differ by )\S+ \(max abs; largest reference magnitude \S+, tolerance \S+")


def _state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (id(tensor), tensor.detach().clone()) for name, tensor in model.state_dict(keep_vars=True).items()}


def _outcome(bad: BadInput) -> tuple[str, str]:
    """``(what the call gets, whether the model changed)`` for one bad input."""
    model = build_tiny_model("qwen3_moe")
    if bad.prepare is not None:
        bad.prepare(model)
    before = _state(model)
    try:
        with _warnings() as warnings:
            result = bad.attempt(model)
        got = result if isinstance(result, str) else f"returns `{result!r}`"
        got += "".join(f"; warning: {message}" for message in warnings if message.split(": ", 1)[-1] not in got)
    except Exception as error:
        got = f"`{type(error).__name__}`: {error}"
    got = _MEASURED.sub(r"\1<x> (max abs; largest reference magnitude <y>, tolerance <z>", got)
    after = _state(model)
    unchanged = after.keys() == before.keys() and all(
        after[name][0] == before[name][0] and torch.equal(after[name][1], before[name][1]) for name in after
    )
    return got, "unchanged" if unchanged else "changed"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The warnings the ``defuser`` logger gives during the block (not printed)."""
    logger = logging.getLogger("defuser")
    collect = _Collect()
    propagate = logger.propagate
    logger.addHandler(collect)
    logger.propagate = False
    try:
        yield collect.messages
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate


def bad_inputs_markdown() -> str:
    """The table of ``docs/bad-inputs.md``: every bad input, what it gets, the model after."""
    rows = ["| input | what it gets | model |", "|---|---|---|"]
    for bad in BAD_INPUTS:
        got, model = _outcome(bad)
        cell = got.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{bad.written}` | {cell} | {model} |")
    return "\n".join(rows)


def _table_in(text: str, first_cell: str = "input") -> str:
    """The markdown table of ``text`` whose header starts with ``first_cell``."""
    pattern = rf"^\| {re.escape(first_cell)} \|.*?(?=\n\n|\n?\Z)"
    match = re.search(pattern, text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no {first_cell!r} table in {BAD_INPUTS_DOC}"
    return match.group(0)


def test_the_bad_input_table_is_true():
    expected = bad_inputs_markdown()
    assert _table_in(BAD_INPUTS_DOC.read_text()) == expected, (
        f"{BAD_INPUTS_DOC.relative_to(ROOT)} is out of date: run `python tests/test_faults.py` to rewrite it"
    )
    assert "docs/bad-inputs.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("bad", [bad for bad in BAD_INPUTS if bad.names], ids=lambda bad: bad.written)
def test_every_rejected_input_names_the_offending_value_and_changes_nothing(bad):
    got, model = _outcome(bad)
    assert bad.names in got, f"{bad.written}: {got!r} does not name {bad.names}"
    assert model == "unchanged"


# --- the bad-input table of `defuser convert` -----------------------------------------------


@dataclass(frozen=True)
class ConvertBadInput:
    """One bad input to ``defuser convert``: how it is written, how to make it from a fresh tiny
    fused qwen3_moe checkpoint ``SRC`` (8 experts) and the destination ``DST`` (returns the
    extra command-line arguments), and the text its error line must contain (None: no error)."""

    written: str
    prepare: Callable[[Path, Path], list[str]]
    names: str | None = None


def _link_outside(source: Path, destination: Path) -> list[str]:
    outside = source.parent / "elsewhere.json"
    outside.write_text('{"private": true}')
    (source / "tokenizer_config.json").symlink_to(outside)
    return []


def _link_to_dev_zero(source: Path, destination: Path) -> list[str]:
    (source / "tokenizer_config.json").symlink_to("/dev/zero")
    return []


def _killed_run_left(source: Path, destination: Path) -> list[str]:
    """The temporary folder of a run killed with SIGKILL half-way (a real kill, in a child),
    and a folder with a name like ours but no marker."""
    import subprocess

    killed = (
        "import os, sys\nfrom pathlib import Path\nfrom defuser.offline.workspace import Workspace\n"
        "workspace = Workspace(Path(sys.argv[1]), Path(sys.argv[2])).__enter__()\n"
        "(workspace.folder / 'model.safetensors').write_bytes(b'half')\nos.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(destination.parent), str(destination)], timeout=120)
    assert done.returncode == -9
    unmarked = destination.parent / f".{destination.name}.defuser-not-ours"
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("kept")
    return []


def _not_a_checkpoint(source: Path, destination: Path) -> list[str]:
    destination.mkdir()
    (destination / "thesis.tex").write_text("years of work")
    return ["--overwrite"]


def _old_checkpoint(source: Path, destination: Path) -> list[str]:
    shutil.copytree(source, destination)
    return ["--overwrite"]


def _huge_expert_count(source: Path, destination: Path) -> list[str]:
    config = json.loads((source / "config.json").read_text())
    config["num_local_experts"] = 200_000
    (source / "config.json").write_text(json.dumps(config))
    return ["--dry-run"]


def _header(text: bytes) -> Callable[[Path, Path], list[str]]:
    def prepare(source: Path, destination: Path) -> list[str]:
        raw = text + b" " * (-len(text) % 8)
        (source / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
        return []

    return prepare


def _part_one_of_two(source: Path, destination: Path) -> list[str]:
    """A part folder ``DST.part-1-of-2`` as ``--shards 1/2`` leaves it (the tiny checkpoint has one
    output shard, so a real run would refuse two parts): the manifest of this plan, the shard."""
    from defuser.offline import plan_conversion
    from defuser.offline.parts import MANIFEST_NAME, plan_fingerprint

    part = destination.with_name(f"{destination.name}.part-1-of-2")
    part.mkdir()
    manifest = {"part": 1, "parts": 2, "plan": plan_fingerprint(plan_conversion(source, destination)), "shards": []}
    (part / MANIFEST_NAME).write_text(json.dumps(manifest))
    return ["--merge"]


def _list_model_type(source: Path, destination: Path) -> list[str]:
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = ["qwen3_moe"]
    (source / "config.json").write_text(json.dumps(config))
    return []


@contextlib.contextmanager
def _full_disk_after(room: int) -> Iterator[None]:
    """Every safetensors file written fails with ``[Errno 28]`` once ``room`` bytes are in it."""
    import errno
    import os

    from defuser.offline import safetensors_io

    class FullDisk:
        def __init__(self, handle: Any):
            self.handle, self.room = handle, room

        def write(self, data: Any) -> int:
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

    def full_disk_open(path: Any, mode: str = "r") -> Any:
        return FullDisk(open(path, mode)) if "w" in mode else open(path, mode)

    safetensors_io.open = full_disk_open
    try:
        yield
    finally:
        del safetensors_io.open


CONVERT_BAD_INPUTS = [
    ConvertBadInput("SRC/tokenizer_config.json is a symlink to a file outside SRC", _link_outside, "tokenizer_config"),
    ConvertBadInput("SRC/tokenizer_config.json is a symlink to /dev/zero", _link_to_dev_zero, "tokenizer_config"),
    ConvertBadInput(
        "DST's parent holds the temporary folder of a run killed with SIGKILL "
        "(and an unmarked `.DST.defuser-not-ours/`)",
        _killed_run_left,
    ),
    ConvertBadInput("`--overwrite` onto a DST holding no checkpoint (`thesis.tex`)", _not_a_checkpoint, "DST: holds"),
    ConvertBadInput("`--overwrite` onto a DST holding an older checkpoint", _old_checkpoint),
    ConvertBadInput(
        '`--dry-run` with `"num_local_experts": 200000` in config.json against the 8-expert checkpoint',
        _huge_expert_count,
        "config.json: num_local_experts = 200000",
    ),
    ConvertBadInput(
        "SRC/model.safetensors whose header nests 200,000 deep",
        _header(b"[" * 200_000 + b"]" * 200_000),
        "model.safetensors",
    ),
    ConvertBadInput(
        "SRC/model.safetensors whose header holds a 5,000-digit integer",
        _header(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'),
        "model.safetensors",
    ),
    ConvertBadInput('`"model_type": ["qwen3_moe"]` in SRC/config.json', _list_model_type, "model_type"),
    ConvertBadInput("the disk fills up while a shard is written", lambda source, destination: [], "model.safetensors"),
    ConvertBadInput("`--shards 2/2` for a result of one shard", lambda source, destination: ["--shards", "2/2"], "2/2"),
    ConvertBadInput(
        "`--merge` with no part folders beside DST", lambda source, destination: ["--merge"], "part-I-of-N"
    ),
    ConvertBadInput("`--merge` with part 1 of 2 only", _part_one_of_two, "DST.part-2-of-2: missing"),
]


def _tiny_checkpoint(folder: Path) -> Path:
    """A fused tiny qwen3_moe checkpoint (its state dict as it is) in ``folder``."""
    from safetensors.torch import save_file

    model = build_tiny_model("qwen3_moe")
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def _contents(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` by relative path; ``None`` when there is no folder."""
    if not folder.is_dir():
        return None
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _convert_outcome(bad: ConvertBadInput, root: Path, checkpoint: Path) -> tuple[str, str]:
    """``(what `defuser convert SRC DST` prints, what became of DST)`` for one bad input, in a
    fresh folder under ``root`` with paths written as SRC and DST."""
    import io
    import os

    from defuser.cli import main

    work = root / re.sub(r"\W+", "-", bad.written)[:60]
    work.mkdir()
    source, destination = shutil.copytree(checkpoint, work / "SRC"), work / "DST"
    arguments = bad.prepare(source, destination)
    before = _contents(destination)
    out, err = io.StringIO(), io.StringIO()
    full_disk = _full_disk_after(4096) if "disk fills up" in bad.written else contextlib.nullcontext()
    progress = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with _warnings() as warnings, full_disk, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["convert", str(source), str(destination), *arguments])
    finally:
        if progress is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = progress
    printed = out.getvalue().splitlines()
    lines = [line for line in err.getvalue().splitlines() if line.startswith("defuser convert: error")]
    lines += [line for line in printed if line.startswith(("replaces:", "dry run"))]
    lines += [f"warning: {message}" for message in warnings if "RoPE" not in message]
    lines += [line for line in printed if line.startswith("wrote ")]
    got = f"exit {code}: " + "; ".join(lines)
    got = got.replace(str(source), "SRC").replace(str(destination), "DST").replace(f"{work}/", "")
    got = re.sub(r"\.defuser-(?!not-ours)\w+", ".defuser-XXXX", got)
    got = re.sub(r" in \d+\.\d s", " in <t> s", got)
    left = sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(".DST.defuser-"))
    after = _contents(destination)
    if after is None:
        state = "absent"
    elif before is None:
        state = "written"
    else:
        state = "unchanged" if after == before else "replaced"
    return got, state + (f"; beside it: {', '.join(left)}" if left else "")


def convert_bad_inputs_markdown() -> str:
    """The second table of ``docs/bad-inputs.md``: bad inputs to ``defuser convert``."""
    import tempfile

    rows = ["| `defuser convert SRC DST` input | what it prints | DST |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoint = _tiny_checkpoint(root / "checkpoint")
        for bad in CONVERT_BAD_INPUTS:
            got, state = _convert_outcome(bad, root, checkpoint)
            cell = got.replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {bad.written} | {cell} | {state} |")
    return "\n".join(rows)


def _convert_table_in(text: str) -> str:
    return _table_in(text, "`defuser convert SRC DST` input")


def test_the_convert_bad_input_table_is_true():
    assert _convert_table_in(BAD_INPUTS_DOC.read_text()) == convert_bad_inputs_markdown(), (
        f"{BAD_INPUTS_DOC.relative_to(ROOT)} is out of date: run `python tests/test_faults.py` to rewrite it"
    )


@pytest.mark.parametrize("bad", CONVERT_BAD_INPUTS, ids=lambda bad: bad.written)
def test_every_convert_bad_input_gets_one_line_naming_it(bad, tmp_path):
    got, state = _convert_outcome(bad, tmp_path, _tiny_checkpoint(tmp_path / "checkpoint"))
    if bad.names is None:
        assert got.startswith("exit 0: ") and state.startswith(("written", "replaced")), got
        assert ".DST.defuser-XXXX" not in state
    else:
        assert got.startswith("exit 1: defuser convert: error: ") and bad.names in got, got
        assert got.count("defuser convert: error") == 1
        assert state in ("absent", "unchanged"), state


def _rewrite_doc() -> None:
    text = BAD_INPUTS_DOC.read_text()
    text = text.replace(_table_in(text), bad_inputs_markdown())
    BAD_INPUTS_DOC.write_text(text.replace(_convert_table_in(text), convert_bad_inputs_markdown()))


if __name__ == "__main__":
    _rewrite_doc()
    sys.stdout.write(f"rewrote {BAD_INPUTS_DOC}\n")
