"""Ties between fused experts tensors, left out of model classes while their experts are patched."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from defuser._hf import own_tied_weights_keys, set_tied_weights_keys
from defuser.engine.preload.state import PATCHES

__all__ = ["install_ties", "untied_fused_tensors"]


def untied_fused_tensors(module_names: tuple[str, ...], tensor_names: Iterable[str]) -> dict[type, dict[str, str]]:
    """Model classes that tie fused experts tensors between two of their parts (DiffusionGemma's
    decoder shares the encoder's experts), with those ties left out: defused modules hold no
    such tensors, and a tie naming nothing fails the build.  The per-expert weights stay tied
    where a broader tie (every ``weight`` of a layer) covers them."""
    from transformers import PreTrainedModel

    suffixes = tuple(sorted(tensor_names))
    found = {}
    for module_name in module_names:
        for value in vars(importlib.import_module(module_name)).values():
            if not (isinstance(value, type) and issubclass(value, PreTrainedModel)):
                continue
            tied = own_tied_weights_keys(value)
            tied = PATCHES.tied_originals.get(value, tied)
            if not isinstance(tied, dict):
                continue
            kept = {
                target: source
                for target, source in tied.items()
                if not (target.rstrip("$").endswith(suffixes) or source.rstrip("$").endswith(suffixes))
            }
            if len(kept) != len(tied):
                found[value] = kept
    return found


def install_ties() -> None:
    """Give each model class that a patched model type unties its ties without the fused
    experts tensors, and every class changed before and no longer needed its own back."""
    wanted: dict[type, dict[str, str]] = {}
    for active in PATCHES.active.values():
        wanted.update(active.tied)
    for cls in list(PATCHES.tied_originals):
        if cls not in wanted:
            set_tied_weights_keys(cls, PATCHES.tied_originals.pop(cls))
    for cls, tied in wanted.items():
        PATCHES.tied_originals.setdefault(cls, own_tied_weights_keys(cls))
        set_tied_weights_keys(cls, tied)
