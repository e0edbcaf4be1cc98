"""The kinds table (``defuser.engine.kinds``): one object per kind a candidate may name, each
defusing its block, recognising the defused form and fusing it back to equal outputs."""

import typing

import torch
from torch import nn

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout
from defuser.engine.kinds import KINDS, defused_kind

E, H, I = 3, 8, 4  # noqa: E741 - experts, hidden, intermediate


class Experts(nn.Module):
    """Non-transposed fused experts: ``gate_up_proj[e]`` is ``[2I, H]``, ``down_proj[e]`` ``[H, I]``."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        self.act_fn = nn.SiLU()


class DenseMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=True)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Parallel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, I, H))

    def forward(self, inputs, sizes):
        groups = inputs.split(sizes)
        return torch.cat([nn.functional.linear(group, self.weight[i]) for i, group in enumerate(groups)])


def test_every_candidate_kind_has_one_entry():
    kind_field = typing.get_type_hints(Candidate, localns={"nn": nn})["kind"]
    assert set(KINDS) == set(typing.get_args(kind_field))
    assert all(name == kind.name for name, kind in KINDS.items())


def test_each_kind_defuses_recognises_and_fuses_back():
    experts_layout = ExpertsLayout(num_experts=E)
    blocks = {
        "experts": (Experts(), experts_layout),
        "dense": (DenseMLP(), DenseLayout()),
        "parallel": (Parallel(), ParallelLayout()),
    }
    for name, (module, layout) in blocks.items():
        kind = KINDS[name]
        fused_names = set(kind.fused_tensors(Candidate("block", module, name, "test", layout)))
        assert fused_names == {tensor.name for tensor in layout.tensors()}, name
        assert defused_kind(module) is None, name
        defused = kind.defuse(Candidate("block", module, name, "test", layout))
        assert defused_kind(defused) is kind, name
        assert kind.defused_layout(defused) == layout, name
        keys = list(kind.defused_keys(defused, "block."))
        assert keys and all(key in {f"block.{k}" for k, _ in defused.named_parameters()} for key in keys), name
        fused = kind.fuse(defused, "block")
        assert defused_kind(fused) is None, name
        assert {key for key, _ in fused.named_parameters()} >= {tensor.name for tensor in layout.tensors()}, name


def test_dense_mlp_fused_back_gives_equal_outputs():
    torch.manual_seed(0)
    mlp, x = DenseMLP(), torch.randn(5, H)
    with torch.no_grad():
        reference = mlp(x)
        fused_storage = mlp.gate_up_proj.weight.untyped_storage().data_ptr()
        kind = KINDS["dense"]
        defused = kind.defuse(Candidate("mlp", mlp, "dense", "test", DenseLayout()))
        # Two [I, H] matmuls instead of one [2I, H]: BLAS may block them differently, so the
        # last bit can differ on some machines (seen in CI); the weights themselves are views.
        torch.testing.assert_close(defused(x), reference, rtol=1e-6, atol=1e-6)
        assert defused.gate_proj.weight.untyped_storage().data_ptr() == fused_storage
        fused = kind.fuse(defused, "mlp")
        torch.testing.assert_close(fused(x), reference, rtol=1e-6, atol=1e-6)
