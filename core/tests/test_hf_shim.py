"""Each private transformers internal behind ``defuser._hf`` still behaves as that module says,
on the installed release (run on the oldest and the newest supported one)."""

import pytest
from transformers import conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming

from defuser import _hf


def test_experts_forward_and_gate_are_recognised_on_a_decorated_class():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

    experts = modeling.Qwen3MoeExperts
    assert _hf.is_experts_forward(experts.forward) and _hf.has_experts_gate(experts)
    assert not _hf.is_experts_forward(modeling.Qwen3MoeMLP.forward)
    assert not _hf.has_experts_gate(modeling.Qwen3MoeMLP)


def test_tied_weights_keys_are_read_and_written_on_the_class_itself():
    class Model:
        _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    class Child(Model):
        pass

    assert _hf.own_tied_weights_keys(Model) == {"lm_head.weight": "embed.weight"}
    assert _hf.own_tied_weights_keys(Child) is None
    _hf.set_tied_weights_keys(Child, {})
    assert _hf.own_tied_weights_keys(Child) == {} and Model._tied_weights_keys


def test_a_registered_conversion_mapping_is_forgotten():
    key = "defuser_shim_test_type"
    conversion_mapping.register_checkpoint_conversion_mapping(key, [WeightRenaming("a", "b")], overwrite=True)
    assert conversion_mapping.get_checkpoint_conversion_mapping(key)
    assert _hf.forget_checkpoint_conversion_mapping(key)
    assert conversion_mapping.get_checkpoint_conversion_mapping(key) is None


@pytest.mark.parametrize("kind", ["renaming", "converter"])
def test_converter_patterns_are_the_written_ones(kind):
    from transformers.core_model_loading import Concatenate

    source, target = r"mlp\.experts\.gate_up_proj$", "mlp.experts.w13"
    if kind == "renaming":
        transform = WeightRenaming(source, target)
    else:
        transform = WeightConverter(source, target, operations=[Concatenate(dim=0)])
    assert _hf.converter_patterns(transform, "source_patterns") == [source]
    assert _hf.converter_patterns(transform, "target_patterns") == [target]


def test_recorded_output_classes_are_named():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

    names = _hf.recorded_output_class_names(modeling.Qwen3MoeModel)
    # A class recorded directly (hidden states) and one named by a recorder (router logits).
    assert {"Qwen3MoeDecoderLayer", "Qwen3MoeTopKRouter"} <= names
    assert _hf.recorded_output_class_names(object) == set()


def test_a_key_no_renaming_fits_falls_back_to_the_selected_converters():
    from transformers import core_model_loading
    from transformers.core_model_loading import Concatenate

    stock = core_model_loading.rename_source_key
    misfiring = WeightRenaming(r"(^|model\.)layers\.", r"\1language_model.layers.")
    split = WeightConverter(r"experts\.gate_up_proj$", "experts.0.gate_proj.weight", operations=[Concatenate(dim=0)])
    model_keys = {"language_model.layers.0.mlp.experts.0.gate_proj.weight": None}
    key = "language_model.layers.0.mlp.experts.gate_up_proj"
    renamed, pattern = stock(key, [misfiring], [split], None, model_keys)
    assert renamed not in model_keys and pattern is not None
    _hf.set_unrenamed_key_fallback(lambda converters: [c for c in converters if c is split])
    try:
        renamed, pattern = core_model_loading.rename_source_key(key, [misfiring], [split], None, model_keys)
        assert renamed in model_keys and pattern is not None
        # Nothing selected: transformers' own answer.
        _hf.set_unrenamed_key_fallback(lambda converters: [])
        assert core_model_loading.rename_source_key(key, [misfiring], [split], None, model_keys)[0] not in model_keys
    finally:
        _hf.set_unrenamed_key_fallback(None)
    assert core_model_loading.rename_source_key is stock


def test_load_check_sees_missing_and_unexpected_keys_of_from_pretrained(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    from defuser.plugin import build_tiny_model

    model = build_tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(key for key in tensors if key.endswith("input_layernorm.weight"))
    tensors["renamed." + name] = tensors.pop(name)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    seen = []
    _hf.set_load_check(lambda model, missing, unexpected: seen.append((type(model), missing, unexpected)))
    try:
        type(model).from_pretrained(tmp_path, config=model.config, dtype=torch.float32)
    finally:
        _hf.set_load_check(None)
    assert seen == [(type(model), {name}, {"renamed." + name})]
    assert not hasattr(PreTrainedModel._adjust_missing_and_unexpected_keys, "_defuser_original")


def test_the_eager_experts_forward_is_the_one_the_decorator_wrapped():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

    eager = _hf.eager_experts_forward(modeling.Qwen3MoeExperts)
    assert eager is not None and eager is not modeling.Qwen3MoeExperts.forward
    assert eager.__qualname__.endswith("Qwen3MoeExperts.forward")
    assert _hf.eager_experts_forward(modeling.Qwen3MoeMLP) is None
