"""Forward inputs for the tiny dots3.note audio and vision encoders, which token ids alone cannot drive:
named by the ``inputs`` of this plugin's ``TinyModel`` recipes, imported only when used."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["dots3_audio_inputs", "vision_patch_inputs"]


def dots3_audio_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    # Mel features of ``length`` tokens per chunk (the conv stem downsamples time by 8).
    config = model.config
    frames = length * 8
    features = torch.randn(batch, config.feature_size, frames, generator=generator)
    return {"input_features": features, "chunk_sample_lengths": torch.full((batch,), frames * config.hop_length)}


def vision_patch_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    # ``batch`` images of 4 x 4 patches, flattened the way the image processor hands them over.
    config = model.config
    patch = config.num_channels * config.patch_size**2 * getattr(config, "temporal_patch_size", 1)
    grid = torch.tensor([[1, 4, 4]] * batch)
    return {"pixel_values": torch.randn(16 * batch, patch, generator=generator), "grid_thw": grid}
