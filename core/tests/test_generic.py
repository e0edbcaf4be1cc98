"""The generic engine on experts classes no plugin knows: made-up decorated classes with
interleaved, transposed, biased and custom-gated layouts, and the routing edge cases."""

import logging

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.moe import use_experts_implementation

from defuser import convert_model
from defuser.engine.experts import DefusedExperts, per_expert_forward

E, H, I = 4, 12, 6  # noqa: E741 - experts, hidden, intermediate as in the fused shapes


def _decorate(cls, **flags):
    try:
        return use_experts_implementation(cls, **flags)
    except TypeError:  # transformers 5.3.0 knows fewer flags
        pytest.skip(f"this transformers does not support {flags}")


class _Base(nn.Module):
    def __init__(self, config, transposed=False, bias=False):
        super().__init__()
        gate_up = (E, H, 2 * I) if transposed else (E, 2 * I, H)
        down = (E, I, H) if transposed else (E, H, I)
        self.gate_up_proj = nn.Parameter(torch.randn(gate_up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.3)
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * I) * 0.1)
            self.down_proj_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        self.act_fn = nn.SiLU()
        self.limit = 0.7
        self.num_experts = E
        self.transposed = transposed

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k in range(top_k_index.shape[1]):
                e = int(top_k_index[t, k])
                if e >= E:
                    continue
                w1 = self.gate_up_proj[e].T if self.transposed else self.gate_up_proj[e]
                w2 = self.down_proj[e].T if self.transposed else self.down_proj[e]
                b1 = self.gate_up_proj_bias[e] if hasattr(self, "gate_up_proj_bias") else None
                b2 = self.down_proj_bias[e] if hasattr(self, "down_proj_bias") else None
                h = self._apply_gate(nn.functional.linear(hidden_states[t], w1, b1))
                out[t] += nn.functional.linear(h, w2, b2) * top_k_weights[t, k]
        return out


class _ClampedInterleaved(_Base):
    def __init__(self, config):
        super().__init__(config, bias=True)

    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        return torch.sigmoid(gate.clamp(max=self.limit)) * (up.clamp(-self.limit, self.limit) + 1)


class _Transposed(_Base):
    def __init__(self, config):
        super().__init__(config, transposed=True)


def _routing(tokens=9, top_k=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=generator)
    index = torch.stack([torch.randperm(E, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    return hidden, index, weights


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


@pytest.mark.parametrize(
    ("cls", "flags"),
    [(_ClampedInterleaved, {"is_concatenated": False, "has_bias": True}), (_Transposed, {"is_transposed": True})],
)
def test_unclaimed_decorated_class_is_defused_generically(cls, flags, caplog):
    torch.manual_seed(0)
    decorated = _decorate(type(f"Toy{cls.__name__}", (cls,), {}), **flags)
    config = PretrainedConfig()
    config._experts_implementation = "eager"
    holder = _Holder(decorated(config))
    hidden, index, weights = _routing()
    with torch.no_grad():
        reference = holder.experts(hidden, index, weights)
    with caplog.at_level(logging.INFO, logger="defuser"):
        assert convert_model(holder) is True
    assert "handled generically" in caplog.text
    assert isinstance(holder.experts, DefusedExperts) and len(holder.experts) == E
    with torch.no_grad():
        assert torch.allclose(holder.experts(hidden, index, weights), reference, atol=1e-5)


def test_interleaved_halves_are_named_by_meaning():
    torch.manual_seed(0)
    decorated = _decorate(type("ToyNames", (_ClampedInterleaved,), {}), is_concatenated=False, has_bias=True)
    config = PretrainedConfig()
    config._experts_implementation = "eager"
    holder = _Holder(decorated(config))
    fused = holder.experts.gate_up_proj.detach().clone()
    fused_bias = holder.experts.gate_up_proj_bias.detach().clone()
    assert convert_model(holder)
    expert = holder.experts[2]
    assert torch.equal(expert.gate_proj.weight, fused[2, 0::2]) and torch.equal(expert.up_proj.weight, fused[2, 1::2])
    assert torch.equal(expert.gate_proj.bias, fused_bias[2, 0::2])


def test_sentinel_index_and_idle_experts_contribute_nothing():
    decorated = _decorate(type("ToySentinel", (_Transposed,), {}), is_transposed=True)
    config = PretrainedConfig()
    config._experts_implementation = "eager"
    holder = _Holder(decorated(config))
    hidden, index, weights = _routing(tokens=5)
    index[:, 1] = E  # expert-parallel sentinel: not a local expert
    index[:, 0] = 1  # only expert 1 receives tokens
    with torch.no_grad():
        reference = holder.experts(hidden, index, weights)
        assert convert_model(holder)
        assert torch.allclose(per_expert_forward(holder.experts, hidden, index, weights), reference, atol=1e-5)


@pytest.mark.parametrize(
    "make_view",
    [
        lambda t: t.transpose(-1, -2),  # column blocks, with a partial last block
        lambda t: t.transpose(-1, -2)[:, 3:],
        lambda t: t.unflatten(-1, (t.shape[-1] // 2, 2)).movedim(-1, 1).transpose(-1, -2),
        lambda t: t[:, :, :5].transpose(-1, -2),  # no wider than one block
        lambda t: t,  # already contiguous
    ],
    ids=["transposed", "offset", "interleaved", "narrow", "contiguous"],
)
def test_dense_copy_equals_contiguous(make_view):
    from defuser.engine.layout import dense_copy

    source = torch.randn(3, 40, 38)
    view = make_view(source)
    copy = dense_copy(view)
    assert copy.is_contiguous() and torch.equal(copy, view.contiguous())
    assert copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr() or view.is_contiguous()
