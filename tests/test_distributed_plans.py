"""Distributed plans on one process: what replace_fused_blocks does to them, and refusals.

The 2-rank behaviour is in tests/test_distributed.py.  Here: the plan entries that name fused
structure disappear from models built defused (and only those), transformers' experts style is
stood in for while patched and given back after, the stand-in never sums replicated experts,
and ``convert_model`` refuses a sharded module before changing anything.  Sharded tensors and
styles need a device mesh: a 1-rank gloo group through a file in a temporary folder (no port).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from defuser import DistributedPlanError, convert_model, replace_fused_blocks, restore_fused_blocks
from defuser.engine.distributed import legacy_api, sharding_of, wildcard_path
from defuser.engine.distributed_preload import _parallel_registry, rewrite_plans
from defuser.engine.experts import DefusedExperts
from defuser.engine.fuse import fused_names
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


def _plans(model: torch.nn.Module) -> dict[str, dict[str, str]]:
    return {name: dict(getattr(model, f"_{name}", None) or {}) for name in ("tp_plan", "ep_plan")}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "phi3"])
def test_defused_models_drop_only_plan_entries_of_fused_structure(model_type: str) -> None:
    """A model built defused keeps the stock plans minus the entries naming its fused tensors
    (and, with transformers 5.3, the experts' own styles and their MoE block's router remap)."""
    stock = _plans(build_tiny_model(model_type))
    assert replace_fused_blocks(model_type)
    model = build_tiny_model(model_type)
    defused = _plans(model)
    paths = {
        wildcard_path(path): module for path, module in model.named_modules() if isinstance(module, DefusedExperts)
    }
    fused = {f"{path}.{name}" for path, module in paths.items() for name in fused_names(module.layout)}
    for plan_name, entries in stock.items():
        kept = defused[plan_name]
        for key, style in entries.items():
            relative = key.removeprefix("model.")
            names_fused = key in fused or relative in fused or relative.endswith(".gate_up_proj")
            legacy_experts = legacy_api() and (relative.endswith("mlp.experts") or style == "ep_router")
            if names_fused or legacy_experts:
                assert key not in kept, f"{plan_name} keeps {key}: {style} on a defused model"
            else:
                assert kept.get(key) == style, f"{plan_name} lost {key}: {style}"
        # Where the release's plan shards fused experts by columns (5.24), per-expert entries stand for them.
        added = set(kept) - set(entries)
        assert all(re.fullmatch(r".*experts\.\*\.(gate|up|down)_proj\.weight", key) for key in added), added


EXPERTS_TP_524 = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_fused_experts_tp_entries_become_per_expert_entries(model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.24's plan shards fused experts by columns; on a defused model the same
    sharding is per-expert parameter entries (no per-Linear hooks: the experts module sums once).
    Layouts defuser cannot slice exactly (gpt_oss: interleaved rows, biases) stay replicated."""
    if legacy_api():
        pytest.skip("transformers 5.3 keeps defused experts replicated")
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    monkeypatch.setattr(
        config_class, "base_model_tp_plan", {**(config_class.base_model_tp_plan or {}), **EXPERTS_TP_524}
    )
    assert replace_fused_blocks(model_type)
    plan = build_tiny_model(model_type)._tp_plan
    per_expert = {key: style for key, style in plan.items() if ".experts.*." in key}
    assert "model.layers.*.mlp.experts.gate_up_proj" not in plan
    assert "model.layers.*.mlp.experts.down_proj" not in plan
    assert plan["model.layers.*.mlp.experts"] == "moe_tp_experts"
    if model_type == "gpt_oss":
        assert per_expert == {}
    else:
        assert per_expert == {
            "model.layers.*.mlp.experts.*.gate_proj.weight": "colwise",
            "model.layers.*.mlp.experts.*.up_proj.weight": "colwise",
            "model.layers.*.mlp.experts.*.down_proj.weight": "rowwise",
        }


def test_rewrite_plans_is_a_no_op_without_defused_blocks() -> None:
    model = build_tiny_model("qwen3_moe")
    before = _plans(model)
    assert rewrite_plans(model) == {}
    assert _plans(model) == before


def test_experts_style_stand_in_is_installed_while_patched_only() -> None:
    registry = _parallel_registry()
    if registry is None or "moe_tp_experts" not in registry:
        pytest.skip("this transformers has no moe_tp_experts style")
    stock = registry["moe_tp_experts"]
    assert replace_fused_blocks("qwen3_moe")
    stand_in = registry["moe_tp_experts"]
    assert stand_in is not stock and stand_in.wrapped is stock
    restore_fused_blocks()
    assert registry["moe_tp_experts"] is stock


def test_stand_in_never_sums_replicated_experts(one_rank_mesh: object) -> None:
    """The stock experts style on defused experts whose weights are not sharded: the output is the
    experts' own, once (the stock style would all-reduce it over the ranks)."""
    registry = _parallel_registry()
    if legacy_api() or "moe_tp_experts" not in registry:
        pytest.skip("transformers 5.3 attaches hooks; its experts stay replicated (see the plan test)")
    assert replace_fused_blocks("qwen3_moe")
    model = build_tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    tokens = torch.randn(5, experts[0].gate_proj.in_features)
    index = torch.tensor([[0, 3], [1, 2], [7, 0], [5, 6], [4, 4]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        expected = experts(tokens, index, weights)
        registry["moe_tp_experts"].install_forward(experts, one_rank_mesh)
        assert torch.equal(experts(tokens, index, weights), expected)


def test_convert_model_refuses_a_sharded_module_before_any_change(one_rank_mesh: object) -> None:
    """Fused experts under a tensor-parallel experts style and with DTensor weights: refused,
    naming the module, the style and the placements; the model is left as it was."""
    if legacy_api():
        pytest.skip("transformers 5.3 shards with plain tensors and hooks (covered by the 2-rank test)")
    from torch.distributed.tensor import Shard, distribute_tensor

    registry = _parallel_registry()
    model = build_tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        tensor = experts._parameters[name]
        experts._parameters[name] = torch.nn.Parameter(distribute_tensor(tensor.detach(), one_rank_mesh, [Shard(0)]))
    registry["moe_tp_experts"].install_forward(experts, one_rank_mesh)
    sharding = sharding_of(experts, "model.layers.0.mlp.experts", model, ["gate_up_proj", "down_proj"])
    assert sharding.sharded and sharding.style == "moe_tp_experts"
    before = {name: tensor for name, tensor in model.named_parameters()}
    with pytest.raises(DistributedPlanError, match=r"model\.layers\.0\.mlp\.experts.*moe_tp_experts.*gate_up_proj"):
        convert_model(model)
    assert {name: tensor for name, tensor in model.named_parameters()} == before
    assert not any(isinstance(module, DefusedExperts) for module in model.modules())
