"""What the model says about its checkpoint keys: the model of a config is built on the meta
device, the installed plugins' candidates give each fused tensor's layout, and converting the
meta model with :func:`defuser.convert_model` gives the names and shapes the per-expert
tensors must have.  The engine's own slicing functions (:mod:`defuser.engine.layout`) cut a
fused tensor into those pieces and join them back.

Per-expert tensors are named as transformers names per-expert checkpoint keys where it has
stock per-expert names (Mixtral's ``block_sparse_moe.experts.N.w1.weight``): ``save_pretrained``
reverses the model's weight conversions, among them the renamings ``convert_model`` attaches.
The same reversal, run on the meta pieces without the conversion that writes defused modules
fused (:mod:`defuser.engine.save`), gives each piece its per-expert name."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from defuser.engine.candidates import (
    Candidate,
    DenseLayout,
    ExpertsLayout,
    FusedTensor,
    FusedTensorRole,
    ParallelLayout,
)
from defuser.engine.layout import join_gate_up, orient, split_gate_up
from defuser.offline.safetensors_io import OfflineConversionError

__all__ = ["FusedSpec", "ModelLayout", "PieceFetcher", "describe_model_layout"]

logger = logging.getLogger(__name__)

PieceFetcher = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class FusedSpec:
    """One fused tensor of the model (by state-dict key) and how it splits into per-expert
    tensors named like ``convert_model``'s state dict.

    ``tensor`` is the layout's own description of it (:meth:`ExpertsLayout.tensors` and the
    like): its role, orientation and the per-expert keys it splits into.
    ``identity_rows`` counts the experts-dimension rows past the routed experts (LongCat's
    identity experts, never read by the forward): dropped by a split, zeros after a join, as
    ``convert_model`` and ``fuse_model`` do.
    """

    key: str
    path: str
    tensor: FusedTensor
    shape: tuple[int, ...]
    layout: ExpertsLayout | DenseLayout | ParallelLayout
    class_name: str
    plugin: str
    identity_rows: int = 0

    @property
    def role(self) -> FusedTensorRole:
        """Which tensor of the fused block it is: experts ``gate_up``, ``gate``, ``up``, ``down``,
        ``gate_up_bias``, ``gate_bias``, ``up_bias``, ``down_bias``; dense ``dense`` (weight or
        bias of the fused Linear); ``parallel`` (a stacked parallel-experts weight)."""
        return self.tensor.role

    @property
    def identity_elements(self) -> int:
        """Elements of the identity rows (dropped by a split, zero-filled by a join)."""
        return self.identity_rows * math.prod(self.shape[1:])

    def _stack(self, fused: torch.Tensor) -> torch.Tensor:
        """Experts weights as ``[E, out, in]`` in ``nn.Linear`` orientation (a view)."""
        layout = self.layout
        stacked = fused.view(layout.num_experts, -1, fused.shape[-1]) if layout.flattened else fused
        return orient(stacked, self.tensor.transposed)[: layout.num_experts]

    def _parts(self, fused: torch.Tensor) -> Iterator[tuple[torch.Tensor, tuple[str, ...]]]:
        """``fused`` cut into views in the module's orientation, each with the names of the
        per-expert tensors it holds: one name, or the gate and up names of a gate-up part.
        Splitting and joining both walk these, so the two cannot disagree on names or order."""
        tensor, path, layout = self.tensor, self.path, self.layout
        if not tensor.per_expert:  # a dense MLP's fused Linear: one gate-up part
            yield fused, tensor.keys(path)
            return
        if tensor.role == "parallel":
            stacked = orient(fused, tensor.transposed)
            # One Linear per expert (a GLU input projection keeps its gate and up rows together).
            for index in range(stacked.shape[0]):
                yield stacked[index], tensor.keys(path, index)
            return
        stacked = fused[: layout.num_experts] if tensor.is_bias else self._stack(fused)
        for index in range(layout.num_experts):
            yield stacked[index], tensor.keys(path, index)

    @property
    def _gate_up_dim(self) -> int:
        """The dimension of a gate-up part that holds its two halves (rows of a weight, a bias's only one)."""
        return -1 if self.tensor.is_bias else -2

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

    def piece_ranges(self, element_size: int, transposed: bool = False) -> tuple[tuple[int, int], ...] | None:
        """``(byte offset, byte count)`` of every piece inside the fused tensor as stored (last
        two dimensions swapped when ``transposed``), in :meth:`pieces` order, when each piece is
        a contiguous range of it: the pieces can then be copied as bytes, without decoding.
        ``None`` when a piece is strided or a copy (interleaved gate-up, a transposed layout)
        or the fused tensor holds identity rows (their content is checked by decoding).

        Found by slicing a meta tensor of the stored shape exactly as :meth:`pieces` slices the
        real one: a piece that is a view of it and contiguous starts at its storage offset."""
        if self.identity_rows:
            return None
        dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[element_size]
        shape = (*self.shape[:-2], self.shape[-1], self.shape[-2]) if transposed else self.shape
        stored = torch.empty(shape, dtype=dtype, device="meta")
        fused = stored.transpose(-1, -2) if transposed else stored
        ranges = []
        for _, piece in self.pieces(fused):
            if not (piece is stored or piece._base is stored) or not piece.is_contiguous():
                return None
            ranges.append((piece.storage_offset() * element_size, piece.numel() * element_size))
        return tuple(ranges)

    def join(self, out: torch.Tensor, fetch: PieceFetcher) -> None:
        """Fill ``out`` (the module's orientation) from the pieces ``fetch(name)`` returns: the
        inverse of :meth:`pieces`; identity rows become zeros."""
        if self.identity_rows:
            out[self.layout.num_experts :].zero_()
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


def _identity_rows(candidate: Candidate, shape: tuple[int, ...]) -> int:
    """Rows of a stacked experts tensor past its routed experts: none, or exactly the identity
    experts its layout declares (anything else is left to the split check to refuse)."""
    layout = candidate.layout
    if candidate.kind != "experts" or layout.flattened or not layout.identity_experts or not shape:
        return 0
    extra = shape[0] - layout.num_experts
    return extra if extra == layout.identity_experts else 0


def _specs_of(candidate: Candidate, shapes: dict[str, tuple[int, ...]]) -> list[FusedSpec]:
    """The fused tensors of one candidate with their roles."""
    path, layout = candidate.path, candidate.layout
    common = {"path": path, "layout": layout, "class_name": candidate.class_name, "plugin": candidate.plugin}
    specs = []
    for tensor in layout.tensors():
        key = f"{path}.{tensor.name}"
        if key in shapes:
            extra = _identity_rows(candidate, shapes[key])
            specs.append(FusedSpec(key=key, tensor=tensor, shape=shapes[key], identity_rows=extra, **common))
        elif tensor.role != "dense":  # a dense Linear without bias has no bias key
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
    model_keys: frozenset[str]  # every key of the fused and of the converted model, saved names included
    tails: dict[str, str]  # tail -> one full key with it (fused keys, piece names, saved names)
    saved_names: dict[str, str] = field(default_factory=dict)  # piece name -> name save_pretrained writes

    def __post_init__(self) -> None:
        self._piece_of = {name: name for name in self.piece_owner}
        self._piece_of.update({saved: name for name, saved in self.saved_names.items()})

    def saved_name(self, piece: str) -> str:
        """The name ``save_pretrained`` of the converted model writes ``piece`` under."""
        return self.saved_names.get(piece, piece)

    def piece_of(self, key: str) -> str | None:
        """The piece (state-dict name) that ``key`` names, under its own or its saved name."""
        return self._piece_of.get(key)

    def names_of(self, piece: str) -> tuple[str, ...]:
        """The names a checkpoint may hold ``piece`` under: saved name first, then defuser's own."""
        saved = self.saved_name(piece)
        return (saved,) if saved == piece else (saved, piece)

    def has_expert_tail(self, key: str) -> bool:
        """Whether ``key`` ends like one of the fused keys, piece names or saved names, whatever
        comes before."""
        return any(key.endswith("." + tail) for tail in self.tails)


def _meta_pieces(spec: FusedSpec) -> list[tuple[str, tuple[int, ...]]]:
    meta = torch.empty(spec.shape, dtype=torch.int16, device="meta")
    return [(name, tuple(piece.shape)) for name, piece in spec.pieces(meta)]


def _saved_names(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Piece name -> the name ``save_pretrained`` writes it under, for the converted meta
    ``model``: transformers' own reversal of the model's weight conversions, run on one distinct
    meta tensor per piece, each traced back to its piece by identity.  Defuser's names are kept
    (with a warning) when the reversal fails or does not hand every piece back unchanged."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers saves state-dict names
        return {}
    from defuser.engine.save import is_fused_on_save

    tensors = {name: torch.empty(shape, dtype=torch.int8, device="meta") for name, shape in shapes.items()}
    by_identity = {id(tensor): name for name, tensor in tensors.items()}
    # The per-expert names only: without the conversion that writes other modules fused.
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is not None:
        model._weight_conversions = [conversion for conversion in conversions if not is_fused_on_save(conversion)]
    try:
        reverted = revert_weight_conversion(model, dict(tensors))
    except Exception as error:  # a mapping that cannot run on meta tensors: keep defuser's names
        logger.warning("%s: save names not found (%s); writing defuser's per-expert names", type(model).__name__, error)
        return {}
    saved = {by_identity[id(tensor)]: key for key, tensor in reverted.items() if id(tensor) in by_identity}
    if saved.keys() != tensors.keys() or len(set(saved.values())) != len(saved):
        lost = sorted(tensors.keys() - saved.keys())
        what = f"{lost[0]!r} is not saved as it is" if lost else "two pieces get the same saved name"
        logger.warning("%s: %s; writing defuser's per-expert names", type(model).__name__, what)
        return {}
    return {name: key for name, key in saved.items() if key != name}


def _tail(path: str, name: str) -> str:
    """``name`` from the last component of the module ``path`` on (``experts.0.gate_proj.weight``)."""
    return path.rsplit(".", 1)[-1] + name[len(path) :]


def describe_model_layout(
    config: Any, check_fused: Callable[[dict[str, FusedSpec]], None] | None = None
) -> ModelLayout:
    """Build the model of ``config`` on the meta device, find its fused tensors with the installed
    plugins and check that splitting them as planned gives exactly the names and shapes that
    ``convert_model`` gives (an error names the module otherwise); the pieces' saved names are
    what ``save_pretrained`` of the converted model writes.  ``check_fused`` sees the fused
    tensors (key -> spec) before ``convert_model`` builds one module per expert, which costs
    memory in proportion to the expert count the config gives: a config far from its
    checkpoint is refused there, cheaply."""
    from defuser.api import convert_model, find_candidates
    from defuser.report import model_on_meta

    model = model_on_meta(config)
    model_type = str(getattr(config, "model_type", "?"))
    before = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    candidates = find_candidates(model)
    if not candidates:
        raise OfflineConversionError(f"nothing to defuse in {type(model).__name__} ({model_type})")
    specs = {spec.key: spec for candidate in candidates for spec in _specs_of(candidate, before)}
    if check_fused is not None:
        check_fused(specs)
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
        spec = specs[key]
        # Identity rows are the only elements a split may leave out, and only as many as declared.
        if sum(math.prod(shape) for _, shape in found) + spec.identity_elements != math.prod(spec.shape):
            problems.append(f"{key!r} {list(spec.shape)} does not split into its per-expert pieces exactly")
    if problems:
        raise OfflineConversionError(f"cannot convert {model_type} offline: {problems[0]}")
    saved_names = _saved_names(model, planned)
    taken = (before.keys() | after.keys()) - saved_names.keys()  # renamed pieces free their names
    clash = next((saved for saved in saved_names.values() if saved in taken), None)
    if clash is not None:
        raise OfflineConversionError(
            f"cannot convert {model_type} offline: a per-expert tensor saves as {clash!r}, which names another tensor"
        )
    tails = {spec.tail: key for key, spec in specs.items()}
    for name, key in piece_owner.items():
        tail = _tail(specs[key].path, name)
        tails.setdefault(tail, name)
        if name in saved_names:
            # The saved name ends like the piece's tail, projection names aside (experts.0.w1.weight).
            saved_tail = ".".join(saved_names[name].split(".")[-len(tail.split(".")) :])
            tails.setdefault(saved_tail, saved_names[name])
    return ModelLayout(
        model_type=model_type,
        model_class=type(model).__name__,
        specs=specs,
        pieces=pieces,
        piece_owner=piece_owner,
        model_keys=frozenset(before) | frozenset(after) | frozenset(saved_names.values()),
        tails=tails,
        saved_names=saved_names,
    )
