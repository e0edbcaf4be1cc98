"""Databricks DBRX: the model types this plugin claims, and what differs from the generic engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from defuser.plugin import Family, TinyModel, TypeSupport

if TYPE_CHECKING:  # importing a plugin must not import torch
    from torch import nn

__all__ = ["plugin"]


def _legacy_orientation(experts: nn.Module) -> bool:
    """True where DBRX computes ``x @ w1`` and ``@ w2.T`` (transformers 5.3.0) instead of
    ``x @ w1.T`` and ``@ w2``.  Square tiny shapes cannot tell, so ask the forward itself."""
    import torch

    glu = experts.mlp
    generator = torch.Generator().manual_seed(0)
    x, w1, v1, w2 = (torch.randn(3, 3, generator=generator) for _ in range(4))
    with torch.no_grad():
        produced = glu(x, w1, v1, w2)
        current = (glu.activation_fn(x @ w1.T) * (x @ v1.T)) @ w2
    return not torch.allclose(produced, current)


plugin = Family(
    name="dbrx",
    description="Databricks DBRX",
    model_types=[
        TypeSupport("dbrx", notes="undecorated, flattened 2D w1/v1/w2"),
    ],
    # Flattened [E*F, H] tensors under experts.mlp: w1 gate, v1 up, w2 down; the orientation
    # changed after 5.3.0 (x @ w1.T, @ w2 now; x @ w1, @ w2.T then).
    experts_classes={
        "DbrxExperts": {
            "separate_gate_up": True,
            "flattened": True,
            "gate_name": "mlp.w1",
            "up_name": "mlp.v1",
            "down_name": "mlp.w2",
            "is_transposed": _legacy_orientation,
            "down_transposed": lambda experts: not _legacy_orientation(experts),
            "activation": "mlp.activation_fn",
        }
    },
    tested_on=["5.3.0", "5.24.0", "5.25.0"],
    tiny_models={
        # The default attention config lacks rope_theta; attention always clamps q/k/v and torch
        # refuses a clamp without bounds; 5.3.0's experts run ffn_hidden_size wide, so it must be
        # the hidden size.
        "dbrx": TinyModel(
            config={"attn_config.rope_theta": 10_000.0, "attn_config.clip_qkv": 8.0, "ffn_config.ffn_hidden_size": 32}
        ),
    },
)
