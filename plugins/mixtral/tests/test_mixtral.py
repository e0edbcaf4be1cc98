"""Mixtral conformance, plus loading legacy ``block_sparse_moe.experts.N.w1/w2/w3`` checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from defuser_testkit.conformance import FamilyConformance
from defuser_testkit.tiny import build_tiny_model

_LEGACY_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _legacy_checkpoint(stock: nn.Module, tmp_path: Path) -> dict[str, Path]:
    """The stock per-expert save, with every expert key renamed to the legacy layout."""
    source, target = tmp_path / "per_expert", tmp_path / "legacy"
    shutil.copytree(source, target)
    state = load_file(source / "model.safetensors")
    legacy = {}
    for key, tensor in state.items():
        if ".experts." in key:
            key = key.replace(".mlp.", ".block_sparse_moe.")
            for new, old in _LEGACY_NAMES.items():
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = tensor
    assert any(".block_sparse_moe.experts.0.w1.weight" in key for key in legacy)
    save_file(legacy, target / "model.safetensors", metadata={"format": "pt"})
    return {"legacy": target}


class TestMixtral(FamilyConformance):
    cases = {"mixtral": lambda: build_tiny_model("mixtral")}
    preload = {"mixtral"}
    generate = {"mixtral"}
    extra_checkpoints = {"mixtral": _legacy_checkpoint}
