"""Hooks registered on a fused module follow its replacement, or the conversion refuses them.

A hook on ``mlp.experts`` (activation capture, calibration) must see the same module role,
the same inputs and the same outputs after ``convert_model`` as before, and after
``fuse_model`` again; its handle must still remove it.  Hooks that cannot follow (on a fused
``gate_up_proj`` Linear that is split, on a fused tensor, state-dict hooks, old-style backward
hooks) make the conversion fail, naming them, with the module left as it was.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from defuser import convert_model, fuse_model
from defuser.api import ConversionError
from defuser.engine.experts import DefusedExperts
from defuser.engine.parallel import DefusedParallelExperts
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5

# model type -> path of one fused module whose replacement keeps its forward signature
HOOKED = {
    "qwen3_moe": "model.layers.0.mlp.experts",  # zero-copy views
    "gpt_oss": "model.layers.0.mlp.experts",  # copies; routing passed by keyword
    "jetmoe": "model.layers.0.mlp.input_linear",  # parallel experts
}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    if isinstance(value, dict):
        return [tensor for key in sorted(value) for tensor in _tensors(value[key])]
    return []


class _Recorder:
    """Registers every kind of forward hook on a module and records what each receives."""

    def __init__(self) -> None:
        self.calls: dict[str, list[list[torch.Tensor]]] = {}
        self.modules: list[nn.Module] = []

    def _record(self, kind: str, module: nn.Module, *values) -> None:
        self.modules.append(module)
        self.calls.setdefault(kind, []).append([t for value in values for t in _tensors(value)])

    def register(self, module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        def pre(module, args):
            self._record("pre", module, args)

        def pre_kwargs(module, args, kwargs):
            self._record("pre_kwargs", module, args, kwargs)

        def post(module, args, output):
            self._record("post", module, args, output)

        def post_kwargs(module, args, kwargs, output):
            self._record("post_kwargs", module, args, kwargs, output)

        def always(module, args, output):
            self._record("always", module, output)

        return [
            module.register_forward_pre_hook(pre),
            module.register_forward_pre_hook(pre_kwargs, with_kwargs=True),
            module.register_forward_hook(post),
            module.register_forward_hook(post_kwargs, with_kwargs=True),
            module.register_forward_hook(always, always_call=True),
        ]


def _assert_same_calls(before: _Recorder, after: _Recorder) -> None:
    assert before.calls.keys() == after.calls.keys() == {"pre", "pre_kwargs", "post", "post_kwargs", "always"}
    for kind, calls in before.calls.items():
        assert len(after.calls[kind]) == len(calls) > 0, kind
        for seen_before, seen_after in zip(calls, after.calls[kind], strict=True):
            assert len(seen_before) == len(seen_after), kind
            for expected, actual in zip(seen_before, seen_after, strict=True):
                torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", sorted(HOOKED))
def test_every_forward_hook_kind_follows_convert_and_fuse(model_type):
    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    path = HOOKED[model_type]
    before, after, back = _Recorder(), _Recorder(), _Recorder()
    handles = before.register(model.get_submodule(path))
    tiny_forward(model, inputs)
    for handle in handles:
        handle.remove()
    handles = after.register(model.get_submodule(path))

    assert convert_model(model)

    defused = model.get_submodule(path)
    assert isinstance(defused, (DefusedExperts, DefusedParallelExperts))
    tiny_forward(model, inputs)
    _assert_same_calls(before, after)
    assert all(module is defused for module in after.modules), "the hooks receive the module that ran"

    # A hook registered on the defused module, and the ones carried over, come back with fuse_model.
    back_handles = back.register(defused)
    assert fuse_model(model)
    fused = model.get_submodule(path)
    assert type(fused).__name__ == type(before.modules[0]).__name__
    after.calls.clear()
    tiny_forward(model, inputs)
    _assert_same_calls(before, after)
    _assert_same_calls(before, back)

    # The handles the user holds still remove the hooks, wherever they now run.
    for handle in handles + back_handles:
        handle.remove()
    after.calls.clear()
    tiny_forward(model, inputs)
    assert after.calls == {}


def test_hooks_that_change_inputs_and_outputs_keep_their_effect():
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    experts = model.model.layers[1].mlp.experts

    def halve_the_input(module, args, kwargs):
        return (args[0] * 0.5, *args[1:]), kwargs

    experts.register_forward_pre_hook(halve_the_input, with_kwargs=True)
    experts.register_forward_hook(lambda module, args, output: output + 1.0)
    hooked = tiny_forward(model, inputs)
    assert convert_model(model)
    torch.testing.assert_close(tiny_forward(model, inputs), hooked, atol=ATOL, rtol=0)


def test_full_backward_hooks_follow_the_replacement():
    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    experts = model.model.layers[0].mlp.experts
    seen: dict[str, list[list[torch.Tensor]]] = {"grad_out": [], "grad_in": []}

    def before_backward(module, grad_output):
        seen["grad_out"].append(_tensors(grad_output))

    def after_backward(module, grad_input, grad_output):
        seen["grad_in"].append(_tensors(grad_input))

    experts.register_full_backward_pre_hook(before_backward)
    experts.register_full_backward_hook(after_backward)

    def backward() -> dict[str, list[list[torch.Tensor]]]:
        for calls in seen.values():
            calls.clear()
        model.zero_grad()
        model(**inputs, use_cache=False).logits.float().square().mean().backward()
        return {kind: list(calls) for kind, calls in seen.items()}

    expected = backward()
    assert all(expected.values())
    assert convert_model(model)
    actual = backward()
    for kind, calls in expected.items():
        assert len(actual[kind]) == len(calls), kind
        for before, after in zip(calls, actual[kind], strict=True):
            for expected_grad, actual_grad in zip(before, after, strict=True):
                torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5, rtol=1e-4)


def _module_state(module: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    return dict(module.named_modules()), dict(module.named_parameters())


def _assert_unchanged(module: nn.Module, state) -> None:
    modules, parameters = state
    assert dict(module.named_modules()).keys() == modules.keys()
    assert all(child is modules[name] for name, child in module.named_modules())
    assert all(tensor is parameters[name] for name, tensor in module.named_parameters())


def test_a_hook_on_a_split_dense_linear_is_refused_by_name():
    model = build_tiny_model("phi3")
    inputs = tiny_inputs(model)
    mlp = model.model.layers[0].mlp
    calls = []

    def capture_gate_up(module, args, output):
        calls.append(output.shape)

    mlp.gate_up_proj.register_forward_hook(capture_gate_up)
    state = _module_state(mlp)
    expected = (
        r"defusing model\.layers\.0\.mlp \(Phi3MLP\) failed: .*model\.layers\.0\.mlp\.gate_up_proj has forward "
        r"hooks \(.*capture_gate_up\) and is not part of what replaces it"
    )
    with pytest.raises(ConversionError, match=expected):
        convert_model(model)
    _assert_unchanged(model.model.layers[0].mlp, state)
    tiny_forward(model, inputs)
    assert calls, "the hook still runs on the module left as it was"


@pytest.mark.parametrize(
    "register, named",
    [
        (
            lambda experts: experts.gate_up_proj.register_hook(lambda grad: grad),
            r"experts\.gate_up_proj has gradient hooks register_hook",
        ),
        (
            lambda experts: experts.down_proj.register_post_accumulate_grad_hook(lambda tensor: None),
            r"experts\.down_proj has gradient hooks register_post_accumulate_grad_hook",
        ),
        (lambda experts: experts.register_state_dict_post_hook(lambda *args: None), r"experts has state-dict hooks"),
        (
            lambda experts: experts.register_load_state_dict_post_hook(lambda *args: None),
            r"experts has load-state-dict post-hooks",
        ),
        (
            lambda experts: experts.register_backward_hook(lambda *args: None),
            r"experts has register_backward_hook hooks .*use register_full_backward_hook",
        ),
    ],
    ids=["tensor-hook", "post-accumulate-grad-hook", "state-dict-hook", "load-state-dict-hook", "old-backward-hook"],
)
def test_hooks_that_cannot_follow_are_refused_by_name(register, named):
    model = build_tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    register(experts)
    state = _module_state(experts)
    failed = r"defusing model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\) failed: "
    with pytest.raises(ConversionError, match=failed) as caught:
        convert_model(model)
    assert re.search(named, str(caught.value)), str(caught.value)
    assert model.model.layers[0].mlp.experts is experts
    _assert_unchanged(experts, state)


def test_fuse_model_leaves_a_module_with_hooks_on_a_per_expert_linear(caplog):
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    assert convert_model(model)
    defused = model.model.layers[0].mlp.experts
    calls = []

    def calibrate(module, args, output):
        calls.append(output.shape)

    defused[2].down_proj.register_forward_hook(calibrate)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert fuse_model(model)  # layer 1 fuses
    assert "model.layers.0.mlp.experts.2.down_proj has forward hooks" in caplog.text and "calibrate" in caplog.text
    assert model.model.layers[0].mlp.experts is defused
    assert type(model.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"
    tiny_forward(model, inputs)
    assert calls
