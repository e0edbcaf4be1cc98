"""A drop-in for ModelCloud's Defuser: its module paths, names and semantics where tools rely on them.

- ``defuser.modeling.replace_modules.materialize_model`` (GPTQModel imports it);
- no fused name on a defused module (``hasattr`` is how tools ask "still fused?");
- ``convert_model`` from any root: a wrapper carrying the config, a decoder layer, a bare
  experts module convert what converting the whole model converts there;
- Qwen3-Omni-MoE's text ``forward`` and ``generate(return_audio=False)``;
- ``convert_model`` returns True exactly when it defused something.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from defuser import convert_model, defused_blocks
from defuser.api import find_candidates
from defuser.engine.dense import split_dense_layout
from defuser.engine.experts import DefusedExperts
from defuser.engine.parallel import DefusedParallelExperts
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5
FUSED_EXPERT_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _defusable(model_type: str) -> nn.Module:
    """A tiny model of ``model_type`` with something to defuse on this transformers, or a skip."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"model type {model_type!r} does not exist in this transformers")
    model = build_tiny_model(model_type)
    if not find_candidates(model):
        pytest.skip(f"{model_type}: nothing defusable on this transformers")
    return model


# --- materialize_model ------------------------------------------------------------------------


def test_materialize_model_names_every_tensor_left_on_meta(caplog: pytest.LogCaptureFixture) -> None:
    from defuser.modeling.replace_modules import materialize_model

    with torch.device("meta"):
        model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    on_meta = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    with caplog.at_level(logging.WARNING, logger="defuser"):
        materialize_model(model.model.layers[0])
    warned = [record.getMessage() for record in caplog.records if "meta device" in record.getMessage()]
    layer_tensors = [name for name in on_meta if name.startswith("model.layers.0.")]
    assert len(warned) == len(layer_tensors)
    assert any("mlp.experts.3.gate_proj.weight" in message for message in warned)


def test_materialize_model_releases_the_replaced_fused_modules() -> None:
    from defuser.modeling.replace_modules import materialize_model

    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[0].mlp.experts  # a caller still holding the fused module
    assert isinstance(fused.gate_up_proj, nn.Parameter)
    assert convert_model(model, cleanup_original=False)
    assert isinstance(fused.gate_up_proj, nn.Parameter), "cleanup_original=False keeps it until materialize"
    materialize_model(model)
    assert fused.gate_up_proj is None and fused.down_proj is None
    difference = (tiny_forward(model, inputs) - reference).abs().max().item()
    assert difference <= ATOL, f"per-expert views keep their storage: outputs differ by {difference}"


def test_materialize_model_on_a_model_with_nothing_on_meta_warns_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from defuser.modeling.replace_modules import materialize_model

    model = build_tiny_model("mixtral")
    convert_model(model)
    with caplog.at_level(logging.WARNING, logger="defuser"):
        materialize_model(model)
    assert not [record for record in caplog.records if "meta device" in record.getMessage()]
    with pytest.raises(TypeError, match=r"materialize_model expects a torch\.nn\.Module"):
        materialize_model("model")


# --- defused means defused --------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_no_fused_name_on_defused_experts(model_type: str) -> None:
    model = build_tiny_model(model_type)
    assert convert_model(model)
    experts = [module for module in model.modules() if isinstance(module, DefusedExperts)]
    assert experts
    for module in experts:
        for name in FUSED_EXPERT_NAMES:
            assert not hasattr(module, name), f"{type(module).__name__}.{name} still resolves"
            with pytest.raises(AttributeError):
                getattr(module, name)


@pytest.mark.parametrize("model_type", ["phi3", "glm4", "zamba2"])
def test_split_dense_mlp_has_no_gate_up_proj_and_the_same_outputs_bit_for_bit(model_type: str) -> None:
    model = _defusable(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    stock_classes = {type(module) for module in model.modules()}
    assert convert_model(model)
    split = [module for module in model.modules() if split_dense_layout(module) is not None]
    assert split
    for mlp in split:
        assert not hasattr(mlp, "gate_up_proj")
        assert isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear)
        assert any(isinstance(mlp, stock) for stock in stock_classes), "still an instance of its stock class"
    assert torch.equal(tiny_forward(model, inputs), reference)


def test_models_built_defused_have_no_fused_names_and_initialise() -> None:
    with defused_blocks("qwen3_moe", "phi3"):
        qwen = build_tiny_model("qwen3_moe")
        phi = build_tiny_model("phi3")
    experts = qwen.model.layers[0].mlp.experts
    assert isinstance(experts, DefusedExperts)
    assert not any(hasattr(experts, name) for name in FUSED_EXPERT_NAMES)
    mlp = phi.model.layers[0].mlp
    assert split_dense_layout(mlp) is not None and not hasattr(mlp, "gate_up_proj")
    # transformers' weight init ran over the defused modules (no NaN left from construction).
    for model in (qwen, phi):
        assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
        assert torch.isfinite(tiny_forward(model, tiny_inputs(model))).all()


def test_parallel_experts_have_no_stacked_weight() -> None:
    model = _defusable("jetmoe")
    assert convert_model(model)
    parallel = [module for module in model.modules() if isinstance(module, DefusedParallelExperts)]
    assert parallel and not any(hasattr(module, "weight") for module in parallel)


# --- convert_model from any root ----------------------------------------------------------------


class _Wrapper(nn.Module):
    """A plain module carrying a model's config (no ``base_model_prefix``), as tools wrap models."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.config = inner.config
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def _classes_under(root: nn.Module, prefix: str = "") -> dict[str, str]:
    return {
        path.removeprefix(prefix): type(module).__name__
        for path, module in root.named_modules()
        if path.startswith(prefix)
    }


@pytest.mark.parametrize("model_type", ["dbrx", "jetmoe", "longcat_flash", "qwen3_moe"])
def test_convert_model_on_a_wrapper_converts_plugin_declared_classes(model_type: str) -> None:
    model = _defusable(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    whole = copy.deepcopy(model)
    assert convert_model(whole)
    wrapper = _Wrapper(model)
    assert convert_model(wrapper) is True
    assert _classes_under(wrapper, "inner.") == {k: v for k, v in _classes_under(whole).items() if k}
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def _first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    for path, module in model.named_modules():
        if path.endswith((".layers.0", ".blocks.0")):
            return path, module
    raise AssertionError("no first decoder layer")


@pytest.mark.parametrize("model_type", ["dbrx", "jetmoe", "longcat_flash", "gpt_oss", "qwen3_moe", "phi3"])
def test_convert_model_on_a_decoder_layer_converts_what_the_whole_model_would(model_type: str) -> None:
    model = _defusable(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    whole = copy.deepcopy(model)
    assert convert_model(whole)
    path, layer = _first_layer(model)
    assert convert_model(layer) is True
    assert _classes_under(model, f"{path}.") == _classes_under(whole, f"{path}.")
    assert find_candidates(layer) == []
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


@pytest.mark.parametrize("model_type", ["qwen3_moe", "dbrx"])
def test_convert_model_on_a_bare_experts_module_converts_it_in_place(model_type: str) -> None:
    model = _defusable(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    candidate = find_candidates(model)[0]
    experts = candidate.module
    assert convert_model(experts) is True
    assert isinstance(experts, DefusedExperts), "the caller's reference is the defused module"
    assert model.get_submodule(candidate.path) is experts
    assert not hasattr(experts, "gate_up_proj")
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


# --- Qwen3-Omni-MoE as a text model ---------------------------------------------------------------


def _omni_inputs(model: nn.Module) -> torch.Tensor:
    return torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))


def test_qwen3_omni_text_forward_and_generate_after_conversion() -> None:
    model = _defusable("qwen3_omni_moe")
    ids = _omni_inputs(model)
    with pytest.raises((NotImplementedError, TypeError)):
        model(input_ids=ids)
    assert convert_model(model) is True
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, model.thinker(input_ids=ids).logits)
        generated = model.generate(input_ids=ids, thinker_max_new_tokens=3, do_sample=False)
    sequences = generated if isinstance(generated, torch.Tensor) else generated[0]
    assert sequences.shape[-1] > ids.shape[-1], "generate returned text tokens"
    # A second conversion changes nothing and the patch stays single.
    assert convert_model(model) is False
    assert model(input_ids=ids).logits.shape == logits.shape


def test_qwen3_omni_built_defused_gets_the_text_runtime_from_convert_model() -> None:
    from transformers import CONFIG_MAPPING

    if "qwen3_omni_moe" not in CONFIG_MAPPING:
        pytest.skip("qwen3_omni_moe does not exist in this transformers")
    with defused_blocks("qwen3_omni_moe"):
        model = build_tiny_model("qwen3_omni_moe")
    assert convert_model(model) is False, "built defused: nothing left to defuse"
    ids = _omni_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.thinker(input_ids=ids).logits)


# --- the return value ---------------------------------------------------------------------------


def test_convert_model_returns_true_exactly_when_it_defused_something() -> None:
    model = build_tiny_model("mixtral")
    assert convert_model(model) is True
    assert convert_model(model) is False
    assert convert_model(nn.Sequential(nn.Linear(4, 4))) is False
