"""Forward inputs for tiny DiffusionGemma models, which token ids alone cannot drive: named by the
``inputs`` of this plugin's ``TinyModel`` recipes, imported only when used."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["diffusion_inputs"]


def diffusion_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    # A prompt and a fixed canvas (left out, the model samples the canvas at random).
    config = model.config
    vocab = config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (batch, length), generator=generator)
    canvas = torch.randint(0, vocab, (batch, config.canvas_length), generator=generator)
    return {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "decoder_input_ids": canvas}
