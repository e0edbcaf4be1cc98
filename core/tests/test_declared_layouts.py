"""Layouts plugins declare for undecorated experts, checked on made-up modules against their
own fused forward: flattened 2D storage, separate gate/up tensors, expert-major input,
gamma-weighted shared experts, identity experts and parallel (stacked Linear) experts."""

import pytest
import torch
from torch import nn

from defuser.engine.candidates import ParallelLayout, declared_experts_layout
from defuser.engine.experts import DefusedExperts
from defuser.engine.parallel import DefusedParallelExperts, ParallelExpert

E, H, I = 3, 10, 4  # noqa: E741 - experts, hidden, intermediate


class FlattenedGLU(nn.Module):
    """DBRX-like: w1/v1/w2 flattened to [E*I, H] under a child; w2 is used as ``x @ w2[e]``."""

    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.mlp = nn.Module()
        for name in ("w1", "v1", "w2"):
            setattr(self.mlp, name, nn.Parameter(torch.randn(E * I, H)))
        self.mlp.activation_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        split = (E, I, H)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                x = hidden_states[t]
                gate = self.mlp.activation_fn(x @ self.mlp.w1.view(split)[e].T)
                up = x @ self.mlp.v1.view(split)[e].T
                out[t] += ((gate * up) @ self.mlp.w2.view(split)[e]) * top_k_weights[t, k]
        return out


class ExpertMajor(nn.Module):
    """Llama-4-like: transposed storage, input [E*T, H], every block through its expert."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.randn(E, I, H))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        blocks = hidden_states.view(E, -1, H)
        gate, up = torch.bmm(blocks, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, H)


class GammaShared(nn.Module):
    """Inkling-like shared experts: separate gate/up, scaled per token before down, fp32 sum."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(E, I, H))
        self.up_proj = nn.Parameter(torch.randn(E, I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, gammas):
        tokens = hidden_states.reshape(1, -1, H).expand(E, -1, -1)
        scales = gammas.reshape(-1, E, 1).transpose(0, 1)
        hidden = self.act_fn(torch.bmm(tokens, self.gate_proj.transpose(1, 2))) * torch.bmm(
            tokens, self.up_proj.transpose(1, 2)
        )
        out = torch.bmm(hidden * scales, self.down_proj.transpose(1, 2))
        return out.float().sum(0).to(hidden_states.dtype).view(hidden_states.shape)


class WithIdentityExperts(nn.Module):
    """LongCat-like: indices past the routed experts return the input times its weight."""

    def __init__(self):
        super().__init__()
        self.zero_expert_num = 2
        self.gate_up_proj = nn.Parameter(torch.randn(E + 2, 2 * I, H))
        self.down_proj = nn.Parameter(torch.randn(E, H, I))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e, x = int(top_k_index[t, k]), hidden_states[t]
                if e >= E:
                    y = x
                else:
                    gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2)
                    y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
                out[t] += y * top_k_weights[t, k]
        return out


def _routing(tokens: int, total: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=generator)
    index = torch.stack([torch.randperm(total, generator=generator)[:2] for _ in range(tokens)])
    return hidden, index, torch.rand(tokens, 2, generator=generator)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= 1e-4


def test_flattened_separate_gate_up_with_input_major_down():
    fused = FlattenedGLU()
    fields = dict(
        separate_gate_up=True,
        flattened=True,
        gate_name="mlp.w1",
        up_name="mlp.v1",
        down_name="mlp.w2",
        down_transposed=True,
        activation="mlp.activation_fn",
    )
    layout = declared_experts_layout(fused, **fields)
    assert layout is not None and layout.num_experts == E
    defused = DefusedExperts.from_fused(fused, layout)
    hidden, index, weights = _routing(6, E)
    with torch.no_grad():
        _close(defused(hidden, index, weights), fused(hidden, index, weights))
    assert torch.equal(defused[2].down_proj.weight, fused.mlp.w2.detach().view(E, I, H)[2].T)
    assert defused[1].gate_proj.weight.data_ptr() == fused.mlp.w1.view(E, I, H)[1].data_ptr()  # a view


def test_expert_major_contract():
    fused = ExpertMajor()
    layout = declared_experts_layout(fused, is_transposed=True, contract="expert_major")
    defused = DefusedExperts.from_fused(fused, layout)
    tokens = torch.randn(E * 5, H)
    with torch.no_grad():
        _close(defused(tokens), fused(tokens))


def test_gamma_weighted_shared_experts():
    fused = GammaShared()
    layout = declared_experts_layout(fused, separate_gate_up=True, contract="weighted_all")
    defused = DefusedExperts.from_fused(fused, layout)
    hidden, gammas = torch.randn(2, 3, H), torch.rand(2, 3, E)
    with torch.no_grad():
        _close(defused(hidden, gammas), fused(hidden, gammas))


def test_identity_experts_from_a_per_instance_declaration():
    fused = WithIdentityExperts()
    layout = declared_experts_layout(fused, identity_experts=lambda module: module.zero_expert_num)
    assert layout.identity_experts == 2 and layout.num_experts == E
    defused = DefusedExperts.from_fused(fused, layout)
    hidden, index, weights = _routing(8, E + 2, seed=3)
    assert (index >= E).any()
    with torch.no_grad():
        _close(defused(hidden, index, weights), fused(hidden, index, weights))


def test_declaration_that_does_not_match_returns_none():
    assert declared_experts_layout(ExpertMajor(), gate_up_name="missing") is None
    assert declared_experts_layout(nn.Linear(2, 2)) is None


class Parallel(nn.Module):
    def __init__(self, out_features: int, transposed: bool = False):
        super().__init__()
        shape = (E, H, out_features) if transposed else (E, out_features, H)
        self.weight = nn.Parameter(torch.randn(shape))
        self.transposed = transposed

    def forward(self, inputs, sizes):
        groups = inputs.split(sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)
        weight = self.weight.transpose(1, 2) if self.transposed else self.weight
        return torch.cat([nn.functional.linear(g, weight[i]) for i, g in enumerate(groups)])


@pytest.mark.parametrize("transposed", [False, True])
def test_parallel_experts(transposed: bool):
    """Each expert is a numbered module holding one Linear named ``linear`` (Defuser's names):
    a GLU input projection keeps its gate and up rows together, the parent splits the output."""
    fused = Parallel(2 * I, transposed)
    defused = DefusedParallelExperts(fused, ParallelLayout(transposed=transposed), "model.layers.0.mlp.input_linear")
    assert len(defused) == E
    assert isinstance(defused[0], ParallelExpert) and type(defused[0].linear) is nn.Linear
    assert [name for name, _ in defused.named_parameters()] == [f"{i}.linear.weight" for i in range(E)]
    assert not hasattr(defused, "weight")
    inputs, sizes = torch.randn(7, H), [3, 0, 4]
    with torch.no_grad():
        # A transposed stack is multiplied from a contiguous copy: equal up to rounding.
        same = torch.equal if not transposed else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        assert same(defused(inputs, sizes), fused(inputs, sizes))
        assert same(defused(inputs, torch.tensor(sizes)), fused(inputs, sizes))
    stored = fused.weight.detach()[2]
    assert torch.equal(defused[2].linear.weight, stored.T if transposed else stored)
