"""Tiny checkpoints on disk (weights, config, a word-level tokenizer) for the downstream tools,
which load models by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defuser.tiny import build_tiny_model


def save_tiny_checkpoint(model_type: str, folder: Path, **overrides: object) -> Path:
    """Save a tiny ``model_type`` model (config ``overrides`` applied) with random weights and a
    tokenizer of ``t0 .. tN`` words (one id each) into ``folder``; returns ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_tiny_model(model_type, **overrides)
    model.save_pretrained(folder)
    size = model.config.get_text_config().vocab_size
    vocab = {f"t{index}": index for index in range(size - 1)} | {"[UNK]": size - 1}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", pad_token="t0", eos_token="t1", bos_token="t2"
    )
    tokenizer.save_pretrained(folder)
    return folder


def calibration_texts(count: int = 16, length: int = 32, seed: int = 0) -> list[str]:
    """Random word sequences the tiny tokenizer maps to ids 3..99."""
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"t{index}" for index in torch.randint(3, 100, (length,), generator=generator).tolist())
        for _ in range(count)
    ]


@pytest.fixture
def tiny_checkpoint(tmp_path: Path):
    """``tiny_checkpoint(model_type, **overrides)`` -> the folder of a saved tiny model with a tokenizer."""
    return lambda model_type, **overrides: save_tiny_checkpoint(model_type, tmp_path / model_type, **overrides)
