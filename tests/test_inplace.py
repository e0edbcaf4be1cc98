"""In-place relayout of copy layouts with ``cleanup_original=True`` (``defuser.engine.inplace``).

Transposed or interleaved experts are rewritten inside the fused tensor's own storage, one
expert at a time; the per-expert weights become contiguous views of it.  Outputs stay equal;
a failure part-way (injected here) or after the rewrite puts the original bytes back into the
same Parameter objects; anything else that holds the storage (a tie, a view kept outside the
model, an offload store) keeps the copy path, and without ``cleanup_original`` the fused module
is never written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defuser.engine.inplace as inplace_module
from defuser import convert_model
from defuser.api import ConversionError
from defuser.engine.experts import DefusedExperts
from defuser.engine.inplace import relayout_experts
from defuser.engine.parallel import DefusedParallelExperts
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

ATOL = 1e-5
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", RuntimeError)

# Families whose experts are copied (not views) without in-place relayout.
COPY_LAYOUTS = ["gpt_oss", "openai_privacy_filter", "llama4_text", "aria_text"]


def _buildable(model_type: str) -> nn.Module:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers has no {model_type} in this version")
    return build_tiny_model(model_type)


def _copied_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules whose layout needs copies (transposed or interleaved)."""
    from defuser.api import find_candidates

    copied = {}
    for candidate in find_candidates(model):
        if candidate.kind == "experts" and not candidate.layout.zero_copy:
            copied[candidate.path] = candidate.module
        elif candidate.kind == "parallel" and candidate.layout.transposed:  # transformers 5.3 aria
            copied[candidate.path] = candidate.module
    return copied


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _inside(tensor: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(low <= start and end <= high for low, high in spans)


class _Exactly:
    """A module's parameters as objects, data pointers and values, to compare after a failure."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.parameters = dict(module.named_parameters())
        self.pointers = {name: p.data_ptr() for name, p in self.parameters.items()}
        self.strides = {name: p.stride() for name, p in self.parameters.items()}
        self.values = {name: p.detach().clone() for name, p in self.parameters.items()}

    def assert_same(self, module: nn.Module) -> None:
        assert module is self.module
        now = dict(module.named_parameters())
        assert now.keys() == self.parameters.keys()
        for name, parameter in now.items():
            assert parameter is self.parameters[name], f"{name}: another Parameter object"
            assert parameter.data_ptr() == self.pointers[name], f"{name}: another storage"
            assert parameter.stride() == self.strides[name], f"{name}: another layout"
            assert torch.equal(parameter, self.values[name]), f"{name}: other values"


@pytest.mark.parametrize("model_type", COPY_LAYOUTS)
def test_copy_layouts_are_re_laid_out_in_their_own_storage(model_type):
    model = _buildable(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = _copied_experts(model)
    assert fused, f"{model_type}: no experts with a copy layout"
    spans = [_storage_span(p) for module in fused.values() for p in module.parameters(recurse=False)]
    assert convert_model(model, cleanup_original=True)
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    for path, module in fused.items():
        assert all(p is None for p in module._parameters.values()), f"{path}: fused tensors kept"
        defused = model.get_submodule(path)
        assert isinstance(defused, (DefusedExperts, DefusedParallelExperts))
        weights = [p for p in defused.parameters()]
        assert weights and all(p.is_contiguous() for p in weights)
        outside = [name for name, p in defused.named_parameters() if not _inside(p, spans)]
        assert not outside, f"{path}: {outside[:3]} are not views of the fused storage"


def test_re_laid_out_experts_fuse_back_and_defuse_again():
    from defuser import fuse_model

    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model, cleanup_original=True)
    assert fuse_model(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    assert convert_model(model, cleanup_original=True)
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_without_cleanup_original_the_fused_tensors_are_never_written():
    model = build_tiny_model("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    before = _Exactly(fused)
    assert convert_model(model)
    before.assert_same(fused)
    spans = [_storage_span(p) for p in fused.parameters(recurse=False)]
    weights = [p for name, p in model.model.layers[0].mlp.experts.named_parameters() if name.endswith("weight")]
    assert weights and not any(_inside(p, spans) for p in weights), "copies, not views of the fused tensors"


def _failing_on_call(monkeypatch: pytest.MonkeyPatch, failing_call: int, error: BaseException) -> list[int]:
    """Make the ``failing_call``-th block copy of in-place relayout raise ``error``."""
    real = inplace_module._copy_block
    calls = [0]

    def copy_block(target: torch.Tensor, source: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] == failing_call:
            raise error
        real(target, source)

    monkeypatch.setattr(inplace_module, "_copy_block", copy_block)
    return calls


# 8 experts, two block copies each (into the buffer, back over the block): gate-up is copies
# 1..16, down 17..32.  Fail on the first read, on the first write-back, mid-way, on the last
# write-back of gate-up, and in the second tensor (gate-up already complete).
@pytest.mark.parametrize("failing_call", [1, 2, 7, 16, 21, 32])
def test_a_fault_part_way_puts_the_original_layout_back(monkeypatch, failing_call):
    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[0].mlp.experts
    before = _Exactly(fused)
    _failing_on_call(monkeypatch, failing_call, OUT_OF_MEMORY("out of memory, injected"))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.experts .*out of memory, injected"):
        convert_model(model, cleanup_original=True)
    before.assert_same(model.model.layers[0].mlp.experts)
    assert torch.equal(tiny_forward(model, inputs), reference)


def test_an_interrupt_part_way_propagates_as_it_is_and_restores(monkeypatch):
    model = build_tiny_model("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    before = _Exactly(fused)
    _failing_on_call(monkeypatch, 10, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_model(model, cleanup_original=True)
    before.assert_same(model.model.layers[0].mlp.experts)


def test_a_failure_after_the_relayout_puts_the_original_bytes_back(monkeypatch):
    import defuser.engine.experts as experts_module

    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[1].mlp.experts
    before = _Exactly(fused)
    real_linear_from = experts_module.linear_from
    built = [0]

    def fails_in_the_second_module(weight, bias, requires_grad, bias_requires_grad=None):
        built[0] += 1
        if built[0] == 8 * 3 + 5:  # the 5th Linear of layer 1: its tensors are already re-laid out
            raise OUT_OF_MEMORY("out of memory after the relayout")
        return real_linear_from(weight, bias, requires_grad, bias_requires_grad)

    monkeypatch.setattr(experts_module, "linear_from", fails_in_the_second_module)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.experts"):
        convert_model(model, cleanup_original=True)
    before.assert_same(model.model.layers[1].mlp.experts)
    assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts), "layer 0 converted before"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_a_view_kept_outside_the_model_keeps_the_copy_path():
    model = build_tiny_model("gpt_oss")
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    fused = model.model.layers[0].mlp.experts
    kept = fused.gate_up_proj.detach()[2]  # someone else's view of the fused storage
    kept_values = kept.clone()
    assert convert_model(model, cleanup_original=True)
    assert torch.equal(kept, kept_values), "a tensor held outside the model was rewritten"
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL
    gate = model.model.layers[0].mlp.experts[2].gate_proj.weight
    assert not _inside(gate, [_storage_span(kept)]), "gate-up was copied, not rewritten"
    down = model.model.layers[0].mlp.experts[2].down_proj.weight
    assert down.data_ptr() != 0 and down.is_contiguous()


def test_two_parameters_on_one_storage_keep_the_copy_path():
    model = build_tiny_model("gpt_oss")
    first, second = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    # Not the same Parameter (no tie), but the same bytes: rewriting one would change the other.
    second.down_proj = nn.Parameter(first.down_proj.detach())
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    values = second.down_proj.detach().clone()
    assert convert_model(model, cleanup_original=True, max_layers=1)
    assert torch.equal(second.down_proj, values)
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


def test_a_tied_fused_weight_is_neither_released_nor_rewritten():
    model = build_tiny_model("gpt_oss")
    first, second = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    second.gate_up_proj = first.gate_up_proj
    tied = first.gate_up_proj
    values = tied.detach().clone()
    assert convert_model(model, max_layers=1, cleanup_original=True)
    assert second.gate_up_proj is tied and torch.equal(tied, values)


def test_on_the_meta_device_nothing_is_allocated_or_rewritten():
    from transformers import AutoModelForCausalLM

    from defuser.tiny import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("gpt_oss"))
    assert convert_model(model, cleanup_original=True)
    weights = list(model.model.layers[0].mlp.experts.parameters())
    assert weights and all(p.device.type == "meta" for p in weights)


def test_a_model_loaded_from_a_checkpoint_is_re_laid_out_in_place(tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_model("gpt_oss").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    spans = [_storage_span(p) for p in model.model.layers[0].mlp.experts.parameters(recurse=False)]
    assert convert_model(model, cleanup_original=True)
    assert all(_inside(p, spans) for p in model.model.layers[0].mlp.experts.parameters())
    assert (tiny_forward(model, inputs) - reference).abs().max().item() <= ATOL


# -- relayout_experts on its own -----------------------------------------------------------


# (fused shape, transposed, deinterleave): what the families' fused tensors need.
LAYOUTS = {
    "transpose": ((6, 5, 12), True, False),
    "transpose-deinterleave": ((6, 5, 12), True, True),
    "deinterleave": ((6, 12, 5), False, True),
    "deinterleave-bias": ((6, 12), False, True),
    "large-blocks": ((3, 70, 80), True, True),  # blocks past torch's tiled-transpose threshold
}


def _new_order(block: torch.Tensor, transposed: bool, deinterleave: bool) -> torch.Tensor:
    view = block.t() if transposed else block
    return view.unflatten(0, (view.shape[0] // 2, 2)).movedim(1, 0) if deinterleave else view


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_relayout_gives_each_block_in_the_new_order_and_undoes_exactly(kind):
    shape, transposed, deinterleave = LAYOUTS[kind]
    fused = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    original = fused.clone()
    expected = torch.stack([_new_order(block, transposed, deinterleave).contiguous() for block in original])
    stacked, undo = relayout_experts(fused, transposed, deinterleave)
    assert torch.equal(stacked, expected)
    assert stacked.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert all(stacked[e].is_contiguous() for e in range(shape[0]))
    undo()
    assert torch.equal(fused, original)


@pytest.mark.parametrize("failing_call", range(1, 13))
def test_relayout_failing_at_any_copy_leaves_the_tensor_as_it_was(monkeypatch, failing_call):
    shape, transposed, deinterleave = LAYOUTS["transpose-deinterleave"]
    fused = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    original = fused.clone()
    calls = _failing_on_call(monkeypatch, failing_call, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        relayout_experts(fused, transposed, deinterleave)
    assert calls[0] == failing_call
    assert torch.equal(fused, original)


def test_the_undo_kept_for_the_conversion_does_not_keep_the_buffer(monkeypatch):
    # The undo waits in the conversion's snapshot until the whole conversion ends: holding
    # the buffer would keep one block alive per re-laid-out tensor of every layer until then.
    import weakref

    made = []
    real = inplace_module._buffer

    def buffer(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(inplace_module, "_buffer", buffer)
    shape, transposed, deinterleave = LAYOUTS["transpose-deinterleave"]
    fused = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    original = fused.clone()
    _, undo = relayout_experts(fused, transposed, deinterleave)
    alive = weakref.ref(made.pop())
    assert alive() is None
    undo()
    assert torch.equal(fused, original)
