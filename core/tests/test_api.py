"""Public API behaviour: errors, no-op cases, transactional failure, save/reload, version gate."""

import logging

import pytest
import torch
from torch import nn

from defuser import convert_model, replace_fused_blocks
from defuser.api import ConversionError, find_candidates
from defuser.engine.experts import DefusedExperts
from defuser.tiny import build_tiny_model, tiny_inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_public_api_is_exact():
    import defuser

    assert callable(defuser.convert_model) and callable(defuser.replace_fused_blocks)
    assert {"convert_model", "replace_fused_blocks"} <= set(defuser.__all__)


@pytest.mark.parametrize("bad", [None, "model", 3, object()])
def test_convert_model_rejects_non_modules(bad):
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        convert_model(bad)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-2, ValueError), ("2", TypeError), (1.5, TypeError), (True, TypeError)]
)
def test_max_layers_validation_changes_nothing(value, error):
    model = build_tiny_model("qwen3_moe")
    with pytest.raises(error, match="max_layers"):
        convert_model(model, max_layers=value)
    assert len(find_candidates(model)) == 2


def test_invalid_filter_changes_nothing():
    model = build_tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"'\+:\('"):
        convert_model(model, filter=["+:("])
    with pytest.raises(TypeError):
        convert_model(model, filter="layers")
    assert len(find_candidates(model)) == 2


def test_model_with_nothing_to_defuse_returns_false_and_is_untouched():
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_model(model) is False
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_replace_fused_blocks_unknown_type_returns_false():
    assert replace_fused_blocks("llama") is False
    assert replace_fused_blocks("no_such_model_type") is False
    with pytest.raises(TypeError):
        replace_fused_blocks(None)


def test_old_transformers_warns_and_returns_false(monkeypatch, caplog):
    from packaging.version import Version

    import defuser.compat as compat

    monkeypatch.setattr(compat, "transformers_version", lambda: Version("5.2.0"))
    model = build_tiny_model("qwen3_moe")
    with caplog.at_level(logging.WARNING, logger="defuser"):
        assert convert_model(model) is False
        assert replace_fused_blocks("qwen3_moe") is False
    assert "5.3.0" in caplog.text and "5.2.0" in caplog.text
    assert len(find_candidates(model)) == 2


def test_failing_defusion_leaves_module_as_it_was(defuser_plugin_manager):
    from defuser import hookimpl

    class Exploding:
        @hookimpl(tryfirst=True)
        def defuser_defuse_candidate(self, candidate):
            if candidate.path.endswith("layers.1.mlp.experts"):
                raise MemoryError("simulated out of memory")

    defuser_plugin_manager.register(Exploding(), "exploding")
    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = _logits(model, inputs)
    second = model.model.layers[1].mlp.experts
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.experts"):
        convert_model(model)
    assert model.model.layers[1].mlp.experts is second
    assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts)  # converted before the failure
    assert torch.allclose(_logits(model, inputs), reference, atol=1e-5)


def test_converted_model_saves_and_reloads_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("qwen3_moe")
    inputs = tiny_inputs(model)
    reference = _logits(model, inputs)
    assert convert_model(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert find_candidates(reloaded), "stock transformers should rebuild the fused layout"
    assert torch.allclose(_logits(reloaded, inputs), reference, atol=1e-5)


def test_per_expert_weights_are_views_of_fused_storage():
    model = build_tiny_model("qwen3_moe")
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    assert convert_model(model)
    expert = model.model.layers[0].mlp.experts[3]
    assert expert.gate_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_experts_behave_as_a_sequence():
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    experts = model.model.layers[0].mlp.experts
    assert len(experts) == 8 and len(list(experts)) == 8
    assert experts[-1] is experts[7] and experts[1:3] == [experts[1], experts[2]]
    with pytest.raises(IndexError):
        experts[8]
    assert isinstance(experts[0].down_proj, nn.Linear)


def test_cleanup_original_drops_fused_tensors():
    model = build_tiny_model("qwen3_moe")
    fused = model.model.layers[0].mlp.experts
    assert convert_model(model, cleanup_original=True)
    assert fused.gate_up_proj is None and fused.down_proj is None


def test_cleanup_original_drops_dotted_fused_tensors():
    pytest.importorskip("defuser_dbrx")
    model = build_tiny_model("dbrx")
    fused = model.transformer.blocks[0].ffn.experts
    assert convert_model(model, cleanup_original=True)
    # DBRX keeps its fused tensors under a child: mlp.w1, mlp.v1, mlp.w2.
    assert fused.mlp.w1 is None and fused.mlp.v1 is None and fused.mlp.w2 is None


def test_replaced_fused_modules_are_released_during_conversion(monkeypatch):
    import gc
    import weakref

    from defuser.plugins import DefuserPluginManager

    model = build_tiny_model("gpt_oss")  # a copy layout: the fused tensors are not shared
    fused = [weakref.ref(layer.mlp.experts) for layer in model.model.layers]
    alive_when_defusing = []
    original_defuse = DefuserPluginManager.defuse

    def defuse(self, candidate):
        gc.collect()
        alive_when_defusing.append([ref() is not None for ref in fused])
        return original_defuse(self, candidate)

    monkeypatch.setattr(DefuserPluginManager, "defuse", defuse)
    assert convert_model(model)
    # While layer 1 is defused, layer 0's fused module (and its tensors) is already gone.
    assert alive_when_defusing == [[True, True], [False, True]]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_defused_forward_is_bit_exact_with_the_eager_loop_in_bfloat16(model_type):
    model = build_tiny_model(model_type).to(torch.bfloat16)
    model.set_experts_implementation("eager")
    inputs = tiny_inputs(model)
    reference = _logits(model, inputs)
    assert convert_model(model)
    assert torch.equal(_logits(model, inputs), reference)
