"""What the model says about its checkpoint keys: the model of a config is built on the meta
device, the installed plugins' candidates give each fused tensor's layout, and converting the
meta model with :func:`defuser.convert_model` gives the names and shapes the per-expert
tensors must have.  The engine's own slicing functions (:mod:`defuser.engine.layout`) cut a
fused tensor into those pieces and join them back."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout
from defuser.engine.layout import join_gate_up, orient, split_gate_up
from defuser.offline.safetensors_io import OfflineConversionError

__all__ = ["FusedSpec", "ModelLayout", "PieceFetcher", "describe_model_layout"]

PieceFetcher = Callable[[str], torch.Tensor]
_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class FusedSpec:
    """One fused tensor of the model (by state-dict key) and how it splits into per-expert
    tensors named like ``convert_model``'s state dict.

    ``role`` says which tensor of the fused block it is: experts ``gate_up``, ``gate``, ``up``,
    ``down``, ``gate_up_bias``, ``gate_bias``, ``up_bias``, ``down_bias``; dense ``dense``
    (weight or bias of the fused Linear); ``parallel`` (a stacked parallel-experts weight).
    """

    key: str
    path: str
    role: str
    shape: tuple[int, ...]
    layout: ExpertsLayout | DenseLayout | ParallelLayout
    class_name: str
    plugin: str
    gated: bool = True  # parallel experts only: the GLU input projection

    def _stack(self, fused: torch.Tensor) -> torch.Tensor:
        """Experts weights as ``[E, out, in]`` in ``nn.Linear`` orientation (a view)."""
        layout = self.layout
        stacked = fused.view(layout.num_experts, -1, fused.shape[-1]) if layout.flattened else fused
        transposed = layout.transposed_down if self.role == "down" else layout.is_transposed
        return orient(stacked, transposed)[: layout.num_experts]

    def _parts(self, fused: torch.Tensor) -> Iterator[tuple[torch.Tensor, tuple[str, ...]]]:
        """``fused`` cut into views in the module's orientation, each with the names of the
        per-expert tensors it holds: one name, or the gate and up names of a gate-up part.
        Splitting and joining both walk these, so the two cannot disagree on names or order."""
        path, layout = self.path, self.layout
        if self.role == "dense":
            leaf = self.key.rsplit(".", 1)[1]
            yield fused, (f"{path}.gate_proj.{leaf}", f"{path}.up_proj.{leaf}")
            return
        if self.role == "parallel":
            stacked = orient(fused, layout.transposed)
            for index in range(stacked.shape[0]):
                expert = f"{path}.{index}"
                gated = (f"{expert}.gate_proj.weight", f"{expert}.up_proj.weight")
                yield stacked[index], gated if self.gated else (f"{expert}.weight",)
            return
        bias = self.role.endswith("_bias")
        stacked = fused if bias else self._stack(fused)
        leaf = "bias" if bias else "weight"
        for index in range(layout.num_experts):
            expert = f"{path}.{index}"
            if self.role in ("gate_up", "gate_up_bias"):
                yield stacked[index], (f"{expert}.gate_proj.{leaf}", f"{expert}.up_proj.{leaf}")
            else:
                yield stacked[index], (f"{expert}.{_PROJECTIONS[self.role.removesuffix('_bias')]}.{leaf}",)

    @property
    def _gate_up_dim(self) -> int:
        """The dimension of a gate-up part that holds its two halves (rows of a weight, a bias's only one)."""
        return -1 if self.role == "gate_up_bias" else -2

    def _dense_halves(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, up)`` of a fused dense Linear's weight or bias: row halves, as views."""
        half = part.shape[0] // 2
        first, second = part.narrow(0, 0, half), part.narrow(0, half, half)
        return (first, second) if self.layout.gate_first else (second, first)

    def pieces(self, fused: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(state-dict name, tensor)`` of every per-expert piece of ``fused`` (the module's
        orientation), in a fixed order; tensors may be views of ``fused``."""
        for part, names in self._parts(fused):
            if len(names) == 1:
                yield names[0], part
            elif self.role == "dense":
                yield from zip(names, self._dense_halves(part), strict=True)
            else:
                yield from zip(names, split_gate_up(part, self.layout, dim=self._gate_up_dim), strict=True)

    def join(self, out: torch.Tensor, fetch: PieceFetcher) -> None:
        """Fill ``out`` (the module's orientation) from the pieces ``fetch(name)`` returns: the
        inverse of :meth:`pieces`."""
        for part, names in self._parts(out):
            if len(names) == 1:
                part.copy_(fetch(names[0]))
            elif self.role == "dense":
                # The halves are views of ``out``: filled in place, no joined temporary.
                for half, name in zip(self._dense_halves(part), names, strict=True):
                    half.copy_(fetch(name))
            else:
                gate, up = fetch(names[0]), fetch(names[1])
                part.copy_(join_gate_up(gate, up, self.layout, dim=self._gate_up_dim))

    @property
    def tail(self) -> str:
        """The fused key from the module's own name on (``experts.gate_up_proj``): what a
        checkpoint with other key prefixes still shares with it."""
        return self.path.rsplit(".", 1)[-1] + self.key[len(self.path) :]


def _specs_of(candidate: Candidate, shapes: dict[str, tuple[int, ...]]) -> list[FusedSpec]:
    """The fused tensors of one candidate with their roles."""
    path, layout = candidate.path, candidate.layout
    common = {"path": path, "layout": layout, "class_name": candidate.class_name, "plugin": candidate.plugin}
    roles: list[tuple[str, str]] = []
    gated = True
    if candidate.kind == "dense":
        roles = [(f"{layout.fused_name}.weight", "dense"), (f"{layout.fused_name}.bias", "dense")]
    elif candidate.kind == "parallel":
        roles = [(layout.weight_name, "parallel")]
        gated = bool(layout.gated_paths) and re.search(layout.gated_paths, path) is not None
    else:
        if layout.separate_gate_up:
            roles = [(layout.gate_name, "gate"), (layout.up_name, "up")]
            first_bias = "gate_bias"
        else:
            roles = [(layout.first_name, "gate_up" if layout.has_gate else "up")]
            first_bias = "gate_up_bias" if layout.has_gate else "up_bias"
        roles.append((layout.down_name, "down"))
        if layout.has_bias:
            roles += [(f"{layout.first_name}_bias", first_bias), (f"{layout.down_name}_bias", "down_bias")]
    specs = []
    for name, role in roles:
        key = f"{path}.{name}"
        if key in shapes:
            specs.append(FusedSpec(key=key, role=role, shape=shapes[key], gated=gated, **common))
        elif role != "dense":  # a dense Linear without bias has no bias key
            raise OfflineConversionError(
                f"{path} ({candidate.class_name}): fused tensor {key!r} is not in the model's state dict"
            )
    return specs


@dataclass
class ModelLayout:
    """What the model built from a config says about its checkpoint keys."""

    model_type: str
    model_class: str
    specs: dict[str, FusedSpec]  # fused state-dict key -> spec
    pieces: dict[str, list[tuple[str, tuple[int, ...]]]]  # fused key -> (piece name, shape) in order
    piece_owner: dict[str, str]  # piece name -> fused key
    model_keys: frozenset[str]  # every state-dict key of the fused and of the converted model
    tails: dict[str, str]  # tail -> one full key with it (fused keys and piece names)

    def has_expert_tail(self, key: str) -> bool:
        """Whether ``key`` ends like one of the fused keys or piece names, whatever comes before."""
        return any(key.endswith("." + tail) for tail in self.tails)


def _meta_pieces(spec: FusedSpec) -> list[tuple[str, tuple[int, ...]]]:
    meta = torch.empty(spec.shape, dtype=torch.int16, device="meta")
    return [(name, tuple(piece.shape)) for name, piece in spec.pieces(meta)]


def describe_model_layout(config: Any) -> ModelLayout:
    """Build the model of ``config`` on the meta device, find its fused tensors with the installed
    plugins and check that splitting them as planned gives exactly the names and shapes that
    ``convert_model`` gives (an error names the module otherwise)."""
    from defuser.api import convert_model, find_candidates
    from defuser.report import model_on_meta

    model = model_on_meta(config)
    model_type = str(getattr(config, "model_type", "?"))
    before = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    candidates = find_candidates(model)
    if not candidates:
        raise OfflineConversionError(f"nothing to defuse in {type(model).__name__} ({model_type})")
    specs = {spec.key: spec for candidate in candidates for spec in _specs_of(candidate, before)}
    if not convert_model(model):
        raise OfflineConversionError(f"convert_model defuses nothing in {type(model).__name__} ({model_type})")
    after = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    pieces = {key: _meta_pieces(spec) for key, spec in specs.items()}
    planned = {name: shape for found in pieces.values() for name, shape in found}
    piece_owner = {name: key for key, found in pieces.items() for name, _ in found}
    owner_spec = lambda name: specs[piece_owner[name]]  # noqa: E731
    removed, added = before.keys() - after.keys(), after.keys() - before.keys()
    problems = [
        f"{spec.path} ({spec.class_name}, plugin {spec.plugin}) keeps {key!r}"
        for key, spec in specs.items()
        if key not in removed
    ]
    problems += [
        f"{owner_spec(name).path} ({owner_spec(name).class_name}): convert_model makes no {name!r}"
        for name in planned
        if name not in added
    ]
    problems += [f"convert_model makes {name!r}, which is not planned" for name in sorted(added - planned.keys())]
    problems += [f"convert_model removes {key!r}, which is not planned" for key in sorted(removed - specs.keys())]
    problems += [
        f"{name!r}: planned {list(shape)}, convert_model gives {list(after[name])}"
        for name, shape in planned.items()
        if name in after and after[name] != shape
    ]
    for key, found in pieces.items():
        if sum(math.prod(shape) for _, shape in found) != math.prod(specs[key].shape):
            problems.append(f"{key!r} {list(specs[key].shape)} does not split into its per-expert pieces exactly")
    if problems:
        raise OfflineConversionError(f"cannot convert {model_type} offline: {problems[0]}")
    tails = {spec.tail: key for key, spec in specs.items()}
    for name, key in piece_owner.items():
        spec = specs[key]
        tails.setdefault(spec.path.rsplit(".", 1)[-1] + name[len(spec.path) :], name)
    return ModelLayout(
        model_type=model_type,
        model_class=type(model).__name__,
        specs=specs,
        pieces=pieces,
        piece_owner=piece_owner,
        model_keys=frozenset(before) | frozenset(after),
        tails=tails,
    )
