"""Conversion checks itself: unknown structures are refused, lost tensors and wrong layouts are
caught, and each failure leaves the model as it was (``defuser.engine.selfcheck``,
``defuser.engine.contract``).

The made-up experts classes here are decorated with transformers' own
``@use_experts_implementation``, so the generic engine sees them exactly as it would see a class
of a future transformers release.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

import defuser.plugins as plugins
from defuser import PluginInfo, TypeSupport, convert_model, hookimpl
from defuser.api import ConversionError, find_candidates
from defuser.engine.candidates import Candidate, ExpertsLayout, read_experts_layout
from defuser.engine.experts import DefusedExperts
from defuser.engine.selfcheck import ENV_VERIFY, probed_experts
from defuser.family import Family
from defuser.plugins import DefuserPluginManager
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

EXPERTS, HIDDEN, WIDTH = 4, 16, 8


def _config() -> types.SimpleNamespace:
    return types.SimpleNamespace(_experts_implementation="eager")


@use_experts_implementation
class MadeUpExperts(nn.Module):
    """A plain decorated experts class: concatenated gate-up, SwiGLU, an eager routed loop."""

    def __init__(self, config, seed: int = 0, experts: int = EXPERTS):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * WIDTH, HIDDEN, generator=generator))
        self.down_proj = nn.Parameter(torch.randn(experts, HIDDEN, WIDTH, generator=generator) * 0.3)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for token in range(hidden_states.shape[0]):
            for slot in range(top_k_index.shape[1]):
                expert = int(top_k_index[token, slot])
                gate, up = (self.gate_up_proj[expert] @ hidden_states[token]).chunk(2)
                result = self.down_proj[expert] @ (self.act_fn(gate) * up)
                out[token] += top_k_weights[token, slot] * result
        return out


class RouteScaledExperts(MadeUpExperts):
    """Like ergo's ErgoExperts: derives from a decorated class and overrides its forward (each
    route scaled by a learned per-expert factor the decorator's flags know nothing about)."""

    def __init__(self, config, seed: int = 0):
        super().__init__(config, seed)
        self.route_scale = nn.Parameter(torch.rand(EXPERTS, generator=torch.Generator().manual_seed(9)) + 0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, top_k_weights * self.route_scale[top_k_index])


class PlainSubclass(MadeUpExperts):
    """A subclass that changes nothing it computes: the decorator's flags still describe it."""


class _Block(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = experts


class _Model(nn.Module):
    def __init__(self, *experts: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(_Block(module) for module in experts)


def _routed(tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(tokens)])
    return torch.randn(tokens, HIDDEN, generator=generator), index, torch.rand(tokens, 2, generator=generator)


def _outputs(model: _Model) -> list[torch.Tensor]:
    inputs = _routed()
    with torch.no_grad():
        return [layer.mlp.experts(*inputs) for layer in model.layers]


def _state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (id(tensor), tensor.detach().clone()) for name, tensor in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]], classes: list[type]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert id(tensor) == before[name][0] and torch.equal(tensor, before[name][1]), name
    assert [type(module) for module in model.modules()] == classes


@pytest.fixture
def generic_only(defuser_plugin_manager: DefuserPluginManager) -> DefuserPluginManager:
    """No plugin installed: the generic engine alone decides."""
    return defuser_plugin_manager


# --- the contract: what the decorator's flags do not describe is refused -----------------------


def test_a_subclass_overriding_a_decorated_forward_is_refused_by_the_generic_engine(generic_only):
    model = _Model(RouteScaledExperts(_config()), RouteScaledExperts(_config(), seed=1))
    assert read_experts_layout(model.layers[0].mlp.experts) is not None, "the flags are inherited: a trap"
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert "cannot defuse 2 module(s), so the model was left as it was" in message
    assert "layers.0.mlp.experts, layers.1.mlp.experts (RouteScaledExperts" in message
    assert "RouteScaledExperts.forward overrides the forward of the decorated MadeUpExperts" in message
    assert "filter=" in message
    _assert_unchanged(model, before, classes)
    assert find_candidates(model) == []  # refused modules are no candidates


def test_a_refused_module_left_out_by_the_filter_lets_the_rest_convert(generic_only):
    model = _Model(MadeUpExperts(_config()), RouteScaledExperts(_config(), seed=1))
    reference = _outputs(model)
    assert convert_model(model, filter=["+:experts", r"-:^layers\.1\."]) is True
    assert isinstance(model.layers[0].mlp.experts, DefusedExperts)
    assert type(model.layers[1].mlp.experts) is RouteScaledExperts
    for got, expected in zip(_outputs(model), reference, strict=True):
        torch.testing.assert_close(got, expected)
    assert convert_model(_Model(RouteScaledExperts(_config())), max_layers=None, filter=["-:experts"]) is False


def test_a_subclass_that_overrides_nothing_is_defused(generic_only):
    model = _Model(PlainSubclass(_config()))
    reference = _outputs(model)
    assert convert_model(model) is True
    assert isinstance(model.layers[0].mlp.experts, DefusedExperts)
    torch.testing.assert_close(_outputs(model)[0], reference[0])


def test_tensors_the_flags_do_not_name_are_refused(generic_only):
    experts = MadeUpExperts(_config())
    experts.register_buffer("gate_up_proj_scale", torch.ones(EXPERTS))  # say, a quantisation scale
    model = _Model(experts)
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError, match=r"MadeUpExperts holds tensors its decorator's flags do not describe"):
        convert_model(model)
    _assert_unchanged(model, before, classes)


def test_a_plugin_declaration_makes_an_overriding_subclass_defusable(defuser_plugin_manager):
    # Declaring the class (a layout override) vouches for it; the run-time checks still hold it
    # to its word: the route scale is a tensor the defused module does not carry, so the
    # conservation check fails it and puts it back.
    defuser_plugin_manager.register(_Declaring(), "declaring")
    model = _Model(RouteScaledExperts(_config()))
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert message.startswith("defusing layers.0.mlp.experts (RouteScaledExperts) failed: ")
    assert "route_scale (shape (4,)) of the fused module is not in its replacement" in message
    assert message.endswith("(the module was put back as it was)")
    _assert_unchanged(model, before, classes)


class _Declaring:
    """Claims RouteScaledExperts modules with the decorator's layout (no model type needed)."""

    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="declaring")

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if type(module) is not RouteScaledExperts:
            return None
        return Candidate(path, module, "experts", "declaring", read_experts_layout(module), model_type)


# --- the numeric self-check ------------------------------------------------------------------


class _Misdeclared:
    """Declares one made-up experts class with the decorator's layout but ``overrides``: a wrong
    layout (by default gate and up swapped)."""

    def __init__(self, experts_class: type = MadeUpExperts, **overrides):
        self.experts_class = experts_class
        self.overrides = overrides or {"gate_first": False}

    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="swapped")

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if type(module) is not self.experts_class:
            return None
        layout = read_experts_layout(module).with_overrides(**self.overrides)
        return Candidate(path, module, "experts", "swapped", layout, model_type)


def test_a_wrong_declared_layout_is_caught_by_the_self_check_and_rolled_back(defuser_plugin_manager):
    defuser_plugin_manager.register(_Misdeclared(), "swapped")
    model = _Model(MadeUpExperts(_config()), MadeUpExperts(_config(), seed=1))
    reference = _outputs(model)
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert message.startswith("defusing layers.0.mlp.experts (MadeUpExperts) failed: self-check (1 probe tokens")
    assert "reaching all 4 experts): outputs differ by " in message and "tolerance" in message
    # The flag that makes the outputs match is named (gate_first flipped back is the answer).
    assert "the outputs match with gate_first=True instead: the swapped layout of MadeUpExperts" in message
    assert message.endswith("(the module was put back as it was)")
    _assert_unchanged(model, before, classes)
    for got, expected in zip(_outputs(model), reference, strict=True):
        assert torch.equal(got, expected)


def test_a_probe_failing_on_a_wrong_flag_names_the_flag(defuser_plugin_manager):
    # Declared as stored transposed: the shapes do not fit, the probe fails.
    defuser_plugin_manager.register(_Misdeclared(is_transposed=True), "swapped")
    model = _Model(MadeUpExperts(_config()))
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError, match=r"the outputs match with is_transposed=False instead"):
        convert_model(model)
    _assert_unchanged(model, before, classes)


def test_a_module_above_the_diagnosis_size_gets_no_hint(defuser_plugin_manager, monkeypatch):
    from defuser.engine import selfcheck

    monkeypatch.setattr(selfcheck, "SUSPECT_FLAGS_MAX_BYTES", 0)
    defuser_plugin_manager.register(_Misdeclared(), "swapped")
    model = _Model(MadeUpExperts(_config()))
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    assert "outputs differ by" in str(caught.value) and "the outputs match with" not in str(caught.value)


def test_a_failure_no_single_flag_explains_gets_no_hint(defuser_plugin_manager):
    defuser_plugin_manager.register(_Misdeclared(gate_first=False, is_transposed=True), "swapped")
    model = _Model(MadeUpExperts(_config()))
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    assert "self-check" in str(caught.value) and "the outputs match with" not in str(caught.value)


def test_gate_and_up_named_wrong_are_caught_where_the_outputs_agree(defuser_plugin_manager):
    # gpt-oss's own gate function reads the joined gate-up, so the defused experts join their
    # halves back in the declared order first: a wrong is_concatenated gives equal outputs with
    # gate_proj holding gate and up rows mixed.  The test of which half the gate is affine in
    # names it.
    defuser_plugin_manager.register(
        Family("wrong", [TypeSupport("gpt_oss")], layout_overrides={"GptOssExperts": {"is_concatenated": True}}),
        "wrong",
    )
    model = build_tiny_model("gpt_oss")
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert "the wrong layout of GptOssExperts names the wrong rows gate_proj and up_proj" in message
    assert "only when the halves are read with is_concatenated=False" in message
    _assert_unchanged(model, before, classes)


@use_experts_implementation
class SigmoidGatedExperts(MadeUpExperts):
    """An own gate function (a sigmoid gate, not zero at zero): the defused experts join their
    halves back before calling it."""

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.sigmoid(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for token in range(hidden_states.shape[0]):
            for slot in range(top_k_index.shape[1]):
                expert = int(top_k_index[token, slot])
                gated = self._apply_gate(self.gate_up_proj[expert] @ hidden_states[token])
                out[token] += top_k_weights[token, slot] * (self.down_proj[expert] @ gated)
        return out


def test_an_own_gate_function_declared_right_converts(generic_only):
    model = _Model(SigmoidGatedExperts(_config()))
    (candidate,) = find_candidates(model)
    assert candidate.layout.gate_style == "module"
    reference = _outputs(model)
    assert convert_model(model) is True
    for got, expected in zip(_outputs(model), reference, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


def test_an_own_gate_function_declared_swapped_is_caught(defuser_plugin_manager):
    defuser_plugin_manager.register(_Misdeclared(SigmoidGatedExperts, gate_first=False), "swapped")
    model = _Model(SigmoidGatedExperts(_config()))
    reference = _outputs(model)
    with pytest.raises(ConversionError, match=r"affine in the up half only when .* read with gate_first=True"):
        convert_model(model)
    for got, expected in zip(_outputs(model), reference, strict=True):
        assert torch.equal(got, expected)


def test_with_the_self_check_off_the_wrong_layout_goes_through(defuser_plugin_manager, monkeypatch):
    # What the check is for: without it, the same declaration silently changes the outputs.
    monkeypatch.setenv(ENV_VERIFY, "0")
    defuser_plugin_manager.register(_Misdeclared(), "swapped")
    model = _Model(MadeUpExperts(_config()))
    reference = _outputs(model)
    assert convert_model(model) is True
    assert (_outputs(model)[0] - reference[0]).abs().max() > 1e-2


def test_a_failed_check_of_a_later_class_leaves_earlier_classes_fused(defuser_plugin_manager):
    # Layer 0 holds a class that passes, layer 1 one that fails: the first modules of every
    # class wait uninstalled until all passed, so the whole model stays as it was.
    defuser_plugin_manager.register(_Misdeclared(), "swapped")
    model = _Model(PlainSubclass(_config()), MadeUpExperts(_config(), seed=1), PlainSubclass(_config(), seed=2))
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError, match=r"defusing layers\.1\.mlp\.experts \(MadeUpExperts\) failed: self-check"):
        convert_model(model)
    _assert_unchanged(model, before, classes)


def _probes(caplog: pytest.LogCaptureFixture) -> int:
    figures = [getattr(record, "defuser_selfcheck", None) for record in caplog.records]
    return sum(f["probes"] for f in figures if f is not None)


def test_one_probe_per_class_by_default_and_every_module_with_all(generic_only, monkeypatch, caplog):
    with caplog.at_level(logging.DEBUG, logger="defuser"):
        assert convert_model(_Model(*(MadeUpExperts(_config(), seed=seed) for seed in range(3)))) is True
        assert _probes(caplog) == 1
        caplog.clear()
        monkeypatch.setenv(ENV_VERIFY, "all")
        assert convert_model(_Model(*(MadeUpExperts(_config(), seed=seed) for seed in range(3)))) is True
        assert _probes(caplog) == 3
        caplog.clear()
        monkeypatch.setenv(ENV_VERIFY, "0")
        assert convert_model(_Model(MadeUpExperts(_config()))) is True
        assert _probes(caplog) == 0


def test_a_bad_verify_setting_is_an_error_before_anything_changes(generic_only, monkeypatch):
    monkeypatch.setenv(ENV_VERIFY, "sometimes")
    model = _Model(MadeUpExperts(_config()))
    with pytest.raises(ValueError, match=r"DEFUSER_VERIFY must be 0 \(off\), 1 .* or all, got 'sometimes'"):
        convert_model(model)
    assert type(model.layers[0].mlp.experts) is MadeUpExperts


def test_the_probe_runs_no_user_hooks_and_leaves_the_random_state(generic_only):
    model = _Model(MadeUpExperts(_config()))
    calls = []
    model.layers[0].mlp.experts.register_forward_hook(lambda *args: calls.append(args))
    state = torch.random.get_rng_state()
    assert convert_model(model) is True
    assert calls == []
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_probe_runs_in_the_module_dtype_and_passes_in_bfloat16(generic_only, monkeypatch, caplog):
    model = _Model(MadeUpExperts(_config())).to(torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="defuser"):
        assert convert_model(model) is True
    assert _probes(caplog) == 1


def test_every_tensor_the_layout_does_not_consume_is_carried_over(generic_only):
    # muse_spark-style post-expert norm: a child the defused module keeps, same object.
    model = build_tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    kept = {name: tensor for name, tensor in experts.named_parameters() if name not in ("gate_up_proj", "down_proj")}
    assert convert_model(model) is True
    defused = dict(model.model.layers[0].mlp.experts.named_parameters())
    assert all(defused[name] is tensor for name, tensor in kept.items())


class NormedExperts(MadeUpExperts):
    """A post-expert norm child the decorator's flags (in 5.3.0) cannot name: a plugin declares it."""

    def __init__(self, config, seed: int = 0):
        super().__init__(config, seed)
        self.post_expert_norm = nn.LayerNorm(HIDDEN)


class _DeclaresTheNormThenDropsIt:
    """Declares NormedExperts' norm, defuses through the generic engine, then loses the norm."""

    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="dropping")

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if type(module) is not NormedExperts:
            return None
        layout = read_experts_layout(module).with_overrides(has_post_expert_norm=True)
        return Candidate(path, module, "experts", "dropping", layout, model_type)

    @hookimpl
    def defuser_defuse_candidate(self, candidate):
        from defuser.engine.generic import defuse

        replacement = defuse(candidate)
        del replacement._modules["post_expert_norm"]
        return replacement


def test_a_replacement_that_loses_a_tensor_fails_and_is_rolled_back(defuser_plugin_manager):
    defuser_plugin_manager.register(_DeclaresTheNormThenDropsIt(), "dropping")
    model = _Model(NormedExperts(_config()))
    before, classes = _state(model), [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert message.startswith("defusing layers.0.mlp.experts (NormedExperts) failed: self-check: ")
    assert "post_expert_norm.weight (shape (16,)) of the fused module is not in its replacement" in message
    _assert_unchanged(model, before, classes)


def test_the_undeclared_norm_is_refused_by_the_generic_engine(generic_only):
    with pytest.raises(ConversionError, match=r"holds tensors .* \(post_expert_norm\.weight, post_expert_norm\.bias\)"):
        convert_model(_Model(NormedExperts(_config())))


def test_the_default_probe_reaches_a_spread_of_experts_and_all_reaches_every_one():
    layout = ExpertsLayout(num_experts=64, identity_experts=2)
    assert probed_experts(layout, 64, every_expert=False) == [0, 9, 18, 27, 36, 45, 54, 63, 64, 65]
    assert probed_experts(layout, 64, every_expert=True) == list(range(66))
    assert probed_experts(ExpertsLayout(num_experts=8), 8, every_expert=False) == list(range(8))


class OneOddExpert(MadeUpExperts):
    """Expert ``odd`` computes twice what its weights say: a fused class treating one expert
    specially, which a plugin (wrongly) vouches for as plain."""

    odd = 0

    def forward(self, hidden_states, top_k_index, top_k_weights):
        scale = torch.where(top_k_index == self.odd, 2.0, 1.0)
        return super().forward(hidden_states, top_k_index, top_k_weights * scale)


class _VouchesForOdd:
    @hookimpl
    def defuser_plugin_info(self):
        return PluginInfo(name="vouching")

    @hookimpl
    def defuser_detect_candidate(self, module, path, model_type):
        if not isinstance(module, OneOddExpert):
            return None
        return Candidate(path, module, "experts", "vouching", read_experts_layout(module), model_type)


@pytest.mark.parametrize(
    ("odd", "mode", "caught"),
    [(15, "1", True), (0, "1", True), (7, "1", False), (7, "all", True)],
    ids=["last-expert", "first-expert", "middle-expert-default-misses", "middle-expert-all"],
)
def test_which_experts_a_probe_reaches(defuser_plugin_manager, monkeypatch, odd, mode, caught):
    # 16 experts: the default probe reaches 8 spread from the first to the last (0, 2, 4, 6, 9,
    # 11, 13, 15); DEFUSER_VERIFY=all reaches every one.  This shows the limit of the default.
    monkeypatch.setenv(ENV_VERIFY, mode)
    defuser_plugin_manager.register(_VouchesForOdd(), "vouching")
    experts = OneOddExpert(_config(), experts=16)
    experts.odd = odd
    model = _Model(experts)
    if caught:
        with pytest.raises(ConversionError, match=r"self-check .* outputs differ by"):
            convert_model(model)
        assert type(model.layers[0].mlp.experts) is OneOddExpert
    else:
        assert convert_model(model) is True


# --- meta device ------------------------------------------------------------------------------


def test_on_the_meta_device_the_class_is_checked_on_a_tiny_cpu_model(monkeypatch):
    from defuser.engine import selfcheck

    monkeypatch.setattr(selfcheck, "_CLASS_CHECKS", {})
    config = build_tiny_model("qwen3_moe").config
    with torch.device("meta"):
        model = type(build_tiny_model("qwen3_moe"))(config)
    manager = DefuserPluginManager()
    monkeypatch.setattr(plugins, "_manager", manager)
    manager.register(Family("swapped", [TypeSupport("qwen3_moe")], layout_overrides=_SWAP, priority=10), "swapped")
    before = [type(module) for module in model.modules()]
    with pytest.raises(ConversionError) as caught:
        convert_model(model)
    message = str(caught.value)
    assert "cannot defuse model.layers.0.mlp.experts (Qwen3MoeExperts): its tensors are on the meta device" in message
    assert "failed its self-check on a tiny CPU model built from the model's config" in message
    assert "the outputs match with gate_first=True instead: the swapped layout of Qwen3MoeExperts" in message
    assert [type(module) for module in model.modules()] == before
    manager.unregister("swapped")
    assert convert_model(model) is True  # the right layout passes
    assert all(isinstance(layer.mlp.experts, DefusedExperts) for layer in model.model.layers)


_SWAP = {"Qwen3MoeExperts": {"gate_first": False}}


def test_on_the_meta_device_without_a_config_the_log_says_the_check_was_skipped(generic_only, caplog, monkeypatch):
    from defuser.engine import selfcheck

    monkeypatch.setattr(selfcheck, "_CLASS_CHECKS", {})
    with torch.device("meta"):
        model = _Model(MadeUpExperts(_config()))
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert convert_model(model) is True
    assert "self-check of MadeUpExperts (generic) skipped: its tensors are on the meta device" in caplog.text


def test_tiny_models_convert_with_equal_outputs_under_every_mode(monkeypatch):
    for mode in ("1", "all"):
        monkeypatch.setenv(ENV_VERIFY, mode)
        model = build_tiny_model("qwen3_moe")
        inputs = tiny_inputs(model)
        reference = tiny_forward(model, inputs)
        assert convert_model(model) is True
        assert (tiny_forward(model, inputs) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_the_probe_compares_with_the_eager_loop_whatever_the_model_dispatches_to(monkeypatch, caplog, implementation):
    # batched_mm and grouped_mm gather expert weights per route (copies) and round
    # differently; the probe's reference is transformers' exact per-expert loop.
    from transformers.integrations.moe import ExpertsInterface

    dispatched = []
    real = ExpertsInterface._global_mapping[implementation]

    def spy(*args, **kwargs):
        dispatched.append(implementation)
        return real(*args, **kwargs)

    monkeypatch.setitem(ExpertsInterface._global_mapping, implementation, spy)
    model = build_tiny_model("qwen3_moe")
    model.config._experts_implementation = implementation
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert dispatched, "the fused model did not dispatch to the chosen implementation"
    dispatched.clear()
    with caplog.at_level(logging.DEBUG, logger="defuser"):
        assert convert_model(model) is True
    assert _probes(caplog) == 1 and dispatched == []
    torch.testing.assert_close(tiny_forward(model, inputs), reference, rtol=1e-5, atol=1e-5)
