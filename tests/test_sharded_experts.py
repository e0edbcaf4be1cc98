"""Sharded defused experts on one process: held slices, their checkpoint keys, the TP forward.

The 2-rank behaviour is in tests/test_distributed.py; here the pieces: a module holding a slice
of the experts keeps the model-wide names and routes by local index, a fused checkpoint tensor
splits into exactly the held experts, the key a fused tensor loads through follows the held
slice, and the tensor-parallel forward on DTensor weights (a 1-rank mesh through a file, no
port) equals the plain forward, biases included.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from defuser import DistributedPlanError, convert_model
from defuser.engine import distributed_preload
from defuser.engine.checkpoint import SplitFusedExperts
from defuser.engine.distributed_preload import held_target
from defuser.engine.sharded import HeldExperts, expert_parameters, hold_experts, install_experts_tp_forward
from defuser.engine.sharded_convert import shard_expert_linears
from defuser.tiny import build_tiny_model


@pytest.fixture(autouse=True)
def _undo_patches(defuser_restore_patches: None) -> None:
    """Every replace_fused_blocks a test makes is undone after it."""


@pytest.fixture
def one_rank_mesh(tmp_path: Path) -> Iterator[object]:
    """A 1-rank device mesh on a gloo group rendezvousing through a file."""
    if not dist.is_available():
        pytest.skip("torch has no distributed support")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def _defused_experts(model_type: str = "qwen3_moe") -> tuple[torch.nn.Module, torch.nn.Module]:
    model = build_tiny_model(model_type)
    assert convert_model(model)
    return model, model.model.layers[0].mlp.experts


def _routing(experts: torch.nn.Module, tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, experts[0].down_proj.out_features, generator=generator)
    index = torch.randint(0, len(experts), (tokens, 2), generator=generator)
    weights = torch.rand(tokens, 2, generator=generator)
    return hidden, index, weights


def test_held_experts_keep_model_wide_names_and_route_by_local_index() -> None:
    _, experts = _defused_experts()
    full = list(experts)
    hidden, index, weights = _routing(experts)
    with torch.no_grad():
        # The same tokens through experts 4..7 only, indexed locally: local 0 is expert 4.
        local = torch.where(index >= 4, index - 4, 4)
        expected = experts(hidden, torch.where(index >= 4, index, 8), weights.masked_fill(index < 4, 0))
        hold_experts(experts, 4, 4)
        assert isinstance(experts, HeldExperts) and experts.num_experts == 4 and len(experts) == 4
        assert [name for name in experts._modules if name.isdigit()] == ["4", "5", "6", "7"]
        assert list(experts) == full[4:] and experts[0] is full[4] and experts[-1] is full[7]
        assert list(experts.expert_ids) == [4, 5, 6, 7]
        # Index 4 (= num_experts) marks a route to another rank: it contributes nothing.
        assert torch.equal(experts(hidden, local, weights.masked_fill(index < 4, 0)), expected)
    assert "experts 4..7 held here" in repr(experts)


def test_holding_experts_it_does_not_have_is_refused() -> None:
    _, experts = _defused_experts()
    hold_experts(experts, 0, 4)
    with pytest.raises(DistributedPlanError, match=r"experts \[4, 5\]"):
        hold_experts(experts, 4, 2)


def test_locally_numbered_experts_are_renamed_model_wide() -> None:
    _, experts = _defused_experts()
    children = list(experts)[:4]
    experts.__dict__["_modules"] = {str(index): child for index, child in enumerate(children)}
    experts.num_experts = 4
    hold_experts(experts, 4, 4, numbered_locally=True)
    assert [name for name in experts._modules if name.isdigit()] == ["4", "5", "6", "7"]
    assert list(experts) == children


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_fused_tensor_splits_into_the_held_experts_only(model_type: str) -> None:
    """Rows first..first+n of a fused tensor, named by the model-wide expert number (gpt_oss:
    transposed, interleaved, with biases)."""
    model = build_tiny_model(model_type)
    fused = model.model.layers[0].mlp.experts
    _, experts = _defused_experts(model_type)
    split = SplitFusedExperts("gate_up_proj", "0.gate_proj.weight")
    everything = split.split(fused.gate_up_proj.detach(), experts.layout, "experts")
    held = split.split(fused.gate_up_proj.detach(), experts.layout.with_overrides(num_experts=4), "experts", first=4)
    assert sorted(held) == sorted(key for key in everything if key.split(".")[1] in {"4", "5", "6", "7"})
    assert all(torch.equal(held[key], everything[key]) for key in held)
    bias = (
        split.split(
            fused.gate_up_proj_bias.detach(),
            experts.layout.with_overrides(num_experts=4),
            "experts",
            tensor_name="gate_up_proj_bias",
            first=4,
        )
        if model_type == "gpt_oss"
        else {}
    )
    assert all(key.split(".")[1] in {"4", "5", "6", "7"} for key in bias)


def test_fused_tensor_of_a_held_slice_loads_through_its_first_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    held = nn.Module()  # an entry lapses with its module: this one lives through the test
    monkeypatch.setattr(distributed_preload, "_held_first", {"model.layers.0.mlp.experts": (4, weakref.ref(held))})
    assert (
        held_target("model.layers.0.mlp.experts.0.gate_proj.weight") == "model.layers.0.mlp.experts.4.gate_proj.weight"
    )
    # A base-model checkpoint's key (no "model." prefix) is found too; other layers are left alone.
    assert held_target("layers.0.mlp.experts.0.down_proj.bias") == "layers.0.mlp.experts.4.down_proj.bias"
    assert held_target("model.layers.1.mlp.experts.0.gate_proj.weight").endswith("experts.0.gate_proj.weight")
    assert held_target("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_tensor_parallel_forward_equals_the_plain_forward(model_type: str, one_rank_mesh: object) -> None:
    """Per-expert weights as DTensors over the mesh run on their local slices, the replicated down
    bias added once, the output summed over the (here single) rank: the plain experts' output,
    and their gradients."""
    _, experts = _defused_experts(model_type)
    hidden, index, weights = _routing(experts)
    expected = experts(hidden, index, weights)
    expected.sum().backward()
    # Experts no token reached have no gradient.
    grads = [None if tensor.grad is None else tensor.grad.clone() for _, _, _, tensor in expert_parameters(experts)]
    experts.zero_grad()
    shard_expert_linears(experts, one_rank_mesh)
    install_experts_tp_forward(experts, one_rank_mesh)
    placed = {
        (projection, name): tuple(tensor.placements) for projection, _, name, tensor in expert_parameters(experts)
    }
    assert str(placed[("down_proj", "weight")]) == "(Shard(dim=1),)"
    actual = experts(hidden, index, weights)
    assert torch.allclose(actual, expected, atol=1e-6)
    actual.sum().backward()
    for tensor, grad in zip((tensor for _, _, _, tensor in expert_parameters(experts)), grads, strict=True):
        if grad is None:
            assert tensor.grad is None
        else:
            assert torch.allclose(tensor.grad.full_tensor(), grad, atol=1e-6)
