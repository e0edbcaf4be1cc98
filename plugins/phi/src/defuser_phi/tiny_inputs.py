"""Forward inputs for tiny the Phi-4-multimodal audio encoder models, which token ids alone cannot drive: named by the
``inputs`` of this plugin's ``TinyModel`` recipes, imported only when used."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["phi4_audio_inputs"]


def phi4_audio_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    config = model.config
    features = torch.randn(batch, length * config.time_reduction, config.input_size, generator=generator)
    return {"hidden_states": features, "mask": None}
