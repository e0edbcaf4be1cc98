"""What defusion would do to a model, from its config alone (``defuser inspect``), and a
numerical check of a real one (``defuser verify``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defuser.api import find_candidates
from defuser.engine.candidates import Candidate
from defuser.engine.detect import layer_index
from defuser.engine.kinds import KINDS
from defuser.filtering import compile_filter

__all__ = ["CandidateGroup", "SourceError", "fused_tensors_of", "inspect_model", "load_config", "model_on_meta"]

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


class SourceError(ValueError):
    """A model source that cannot be used (missing, not a config, unknown model type)."""


def load_config(source: str) -> Any:
    """The config of a local model folder, a ``config.json`` file, or a hub id already cached."""
    from transformers import AutoConfig

    path = Path(source)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    elif path.exists() and not (path / "config.json").is_file():
        raise SourceError(f"{source}: no config.json there")
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise SourceError(f"{source}: no such file or directory")
    if path.is_dir():
        from defuser.offline.plan import check_config_file

        # Plain JSON first: a field transformers would choke on is named with its file.
        check_config_file(path)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"{source}: {first_line}") from error


def model_on_meta(config: Any) -> nn.Module:
    """The model ``config`` describes, on the meta device (structure only, no memory)."""
    from defuser.tiny import model_from_config

    with torch.device("meta"):
        return model_from_config(config)


@dataclass
class CandidateGroup:
    """Fused modules of one class at paths that differ only in their layer numbers."""

    pattern: str
    class_name: str
    kind: str
    plugin: str
    when: str  # "before load" (replace_fused_blocks patches it) or "after load"
    fused_tensors: dict[str, list[int]]
    defused_into: str
    count: int = 0
    selected: int = 0
    fused_parameters: int = 0
    layers: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def fused_tensors_of(candidate: Candidate) -> dict[str, torch.Tensor]:
    """The fused tensors of a candidate, by name relative to the candidate's module."""
    return KINDS[candidate.kind].fused_tensors(candidate)


def _defused_into(candidate: Candidate, tensors: dict[str, torch.Tensor]) -> str:
    return KINDS[candidate.kind].describe(candidate, tensors)


def inspect_model(
    model: nn.Module,
    filter: Sequence[str] | None = None,  # noqa: A002 - the name convert_model uses
    max_layers: int | None = None,
) -> list[CandidateGroup]:
    """Group the fused candidates of ``model`` by class and layer-free path, with what a
    ``convert_model(model, filter=..., max_layers=...)`` would select."""
    from defuser.plugins import get_plugin_manager

    rules = compile_filter(filter)
    manager = get_plugin_manager()
    groups: dict[tuple[str, str], CandidateGroup] = {}
    for candidate in find_candidates(model):
        pattern = _NUMBER.sub("*", candidate.path)
        tensors = fused_tensors_of(candidate)
        key = (pattern, candidate.class_name)
        group = groups.get(key)
        if group is None:
            plan = manager.preload_plan(candidate.model_type) if candidate.model_type else None
            group = groups[key] = CandidateGroup(
                pattern=pattern,
                class_name=candidate.class_name,
                kind=candidate.kind,
                plugin=candidate.plugin,
                when="before load" if plan is not None and candidate.kind != "parallel" else "after load",
                fused_tensors={name: list(t.shape) for name, t in tensors.items()},
                defused_into=_defused_into(candidate, tensors),
            )
        index = layer_index(candidate.path)
        group.count += 1
        group.fused_parameters += sum(t.numel() for t in tensors.values())
        if index is not None:
            group.layers.append(index)
        in_range = max_layers is None or (index is not None and index < max_layers)
        if in_range and rules.allows(candidate.path):
            group.selected += 1
    return list(groups.values())
