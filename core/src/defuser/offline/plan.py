"""The conversion plan: every step (copy a tensor, split a fused tensor, join per-expert
tensors), every output shard and file, decided and checked before anything is written, and
the plan in words for ``defuser convert``."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from defuser.engine.layout import ExpertsLayout
from defuser.offline.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    check_destination,
    checked_file,
    load_json,
    open_checkpoint,
    other_files,
    shard_file_names,
)
from defuser.offline.model_layout import FusedSpec, ModelLayout, describe_model_layout
from defuser.offline.safetensors_io import DTYPE_SIZES, OfflineConversionError, OutputTensor, TensorEntry

__all__ = ["ConversionPlan", "ShardPlan", "Step", "check_config_file", "format_plan", "plan_conversion"]

logger = logging.getLogger(__name__)

_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass(frozen=True)
class Step:
    """One unit of work: copy a tensor, split a fused tensor, or join per-expert tensors."""

    kind: Literal["copy", "split", "join"]
    sources: tuple[str, ...]  # checkpoint keys read
    outputs: tuple[OutputTensor, ...]  # tensors written, in order
    fused_key: str | None = None  # the model's state-dict key of the fused tensor
    transposed: bool = False  # the checkpoint stores the fused tensor transposed (last two dims)
    identity_elements: int = 0  # identity-expert elements of the fused tensor: dropped (split), zeros (join)
    # (byte offset in the fused tensor, byte count) of each piece, in order, when every piece is
    # a contiguous range of the fused tensor as stored: a split copies them out as bytes, a join
    # writes the pieces' bytes one after the other; nothing is decoded.  None: decoded.
    ranges: tuple[tuple[int, int], ...] | None = None

    @property
    def piece_count(self) -> int:
        """Per-expert tensors written (split) or read (join)."""
        return len(self.outputs) if self.kind == "split" else len(self.sources)


@dataclass
class ShardPlan:
    """One output file."""

    name: str
    steps: list[Step]
    metadata: dict[str, str] | None

    @property
    def tensors(self) -> list[OutputTensor]:
        """The tensors of the file, in order."""
        return [tensor for step in self.steps for tensor in step.outputs]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(tensor.nbytes for tensor in self.tensors)


@dataclass
class ConversionPlan:
    """Everything a conversion will do, decided before anything is written."""

    source: Path
    destination: Path
    reverse: bool
    overwrite: bool
    checkpoint: Checkpoint
    model_type: str
    model_class: str
    shards: list[ShardPlan]
    files: list[str]  # non-weight files copied, relative to the source
    skipped: list[str] = field(default_factory=list)  # weight files neither converted nor copied
    prefixes: tuple[str, str] = ("", "")  # (checkpoint key prefix, model key prefix) when they differ
    index_metadata: dict[str, Any] | None = None
    layout: ModelLayout | None = field(default=None, repr=False)

    @property
    def steps(self) -> list[Step]:
        """Every step, shard after shard."""
        return [step for shard in self.shards for step in shard.steps]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data written."""
        return sum(shard.nbytes for shard in self.shards)


def _prefixes(keys: list[str], model: ModelLayout) -> tuple[str, str]:
    """``(checkpoint prefix, model prefix)`` that turn the checkpoint's fused or per-expert keys
    into the model's (``("model.", "")`` for a checkpoint saved from a wrapper class), found from
    the first key that ends like one of them; ``("", "")`` when they already agree."""
    special = model.specs.keys() | model.piece_owner.keys() | set(model.saved_names.values())
    if any(key in special for key in keys):
        return "", ""
    for key in keys:
        if not model.has_expert_tail(key):
            continue
        parts = key.split(".")
        for start in range(len(parts)):
            rest = ".".join(parts[start:])
            matches = [name for name in special if name == rest or name.endswith("." + rest)]
            if matches:
                match = min(matches, key=len)
                source_prefix = ".".join(parts[:start]) + "." if start else ""
                return source_prefix, match[: len(match) - len(rest)]
    return "", ""


def plan_conversion(
    source: str | os.PathLike, destination: str | os.PathLike, reverse: bool = False, overwrite: bool = False
) -> ConversionPlan:
    """Check everything and decide every write of converting the checkpoint in ``source`` into
    ``destination`` (fused to per-expert, or back with ``reverse``); nothing is written.

    Raises :class:`OfflineConversionError` naming the offending folder, file or key for an
    unusable source or destination, a checkpoint that does not match its ``config.json``, or a
    model whose fused tensors cannot be converted exactly as ``convert_model`` would.
    """
    from defuser.report import load_config

    src, dst = Path(source).expanduser(), Path(destination).expanduser()
    if not src.is_dir():
        raise OfflineConversionError(f"{src}: no such folder")
    check_destination(src, dst, overwrite)
    checkpoint = open_checkpoint(src)
    config_path = check_config_file(src)
    try:
        config = load_config(str(src))
    except (TypeError, AttributeError, RecursionError) as error:  # a field of a type transformers does not expect
        what = f"{type(error).__name__}: {error}"
        raise OfflineConversionError(f"{config_path}: transformers cannot read it ({what})") from None
    model = describe_model_layout(config, lambda specs: _check_config_fits(specs, checkpoint, config, config_path))
    keys = list(checkpoint.tensors)
    source_prefix, model_prefix = _prefixes(keys, model)

    def to_model(key: str) -> str | None:
        return model_prefix + key[len(source_prefix) :] if key.startswith(source_prefix) else None

    def to_checkpoint(name: str) -> str:
        return source_prefix + name[len(model_prefix) :] if name.startswith(model_prefix) else name

    matched = 0
    for key in keys:
        if to_model(key) in model.model_keys:
            matched += 1
        elif model.has_expert_tail(key):
            raise OfflineConversionError(
                f"{checkpoint.shard_of[key]}: tensor {key!r} looks like a fused or per-expert tensor of "
                f"{model.model_class} ({model.model_type}) but matches no module path; checkpoints whose key "
                "prefixes differ from the model's module paths beyond one common prefix are not supported"
            )
    if not matched:
        raise OfflineConversionError(
            f"{src}: no tensor name matches {model.model_class} ({model.model_type}) built from config.json "
            f"(first key: {keys[0] if keys else 'none'})"
        )
    if (source_prefix, model_prefix) != ("", ""):
        logger.info("checkpoint keys start with %r where the model's start with %r", source_prefix, model_prefix)
    steps_by_shard: dict[str, list[Step]] = {shard: [] for shard in checkpoint.shards}
    joined: set[str] = set()
    for key in keys:
        entry, model_key = checkpoint.tensors[key], to_model(key)
        piece = model.piece_of(model_key) if reverse and model_key is not None else None
        if not reverse and model_key in model.specs:
            step = _split_step(entry, model.specs[model_key], model, to_checkpoint)
        elif piece is not None:
            fused_key = model.piece_owner[piece]
            if fused_key in joined:
                continue  # joined into the shard of its first piece
            joined.add(fused_key)
            step = _join_step(checkpoint, model.specs[fused_key], model, to_checkpoint)
        else:
            step = Step("copy", (key,), (OutputTensor(entry.name, entry.dtype, entry.shape, entry.nbytes),))
        steps_by_shard[checkpoint.shard_of[key]].append(step)
    kind = "join" if reverse else "split"
    if not any(step.kind == kind for steps in steps_by_shard.values() for step in steps):
        logger.warning(
            "%s: no %s tensors of %s found; the checkpoint is copied unchanged",
            src,
            "per-expert" if reverse else "fused",
            model.model_type,
        )
    kept = [shard for shard in checkpoint.shards if steps_by_shard[shard]]
    shards = [
        ShardPlan(name, steps_by_shard[shard], checkpoint.metadata[shard] or {"format": "pt"})
        for name, shard in zip(shard_file_names(len(kept)), kept, strict=True)
    ]
    # One tensor twice: under one name, or a per-expert tensor under its saved and its own name.
    seen: dict[str, str] = {}
    for name in (tensor.name for shard in shards for tensor in shard.tensors):
        model_key = to_model(name)
        meaning = (model.piece_of(model_key) if model_key is not None else None) or name
        if meaning in seen:
            what = repr(name) if seen[meaning] == name else f"one per-expert tensor, as {seen[meaning]!r} and {name!r},"
            raise OfflineConversionError(f"{src}: the result would hold {what} twice (fused and per-expert both?)")
        seen[meaning] = name
    files, skipped = other_files(checkpoint)
    return ConversionPlan(
        source=src,
        destination=dst,
        reverse=reverse,
        overwrite=overwrite,
        checkpoint=checkpoint,
        model_type=model.model_type,
        model_class=model.model_class,
        shards=shards,
        files=files,
        skipped=skipped,
        prefixes=(source_prefix, model_prefix),
        index_metadata=checkpoint.index_metadata,
        layout=model,
    )


def check_config_file(folder: Path) -> Path:
    """``config.json`` of ``folder`` read as plain JSON first, so that a file transformers
    would choke on (bad JSON, nested too deep, an over-long integer, a ``model_type`` that is
    no string) gets an error naming the file and the field."""
    path = folder / "config.json"
    if not (path.exists() or path.is_symlink()):
        raise OfflineConversionError(f"{folder}: no config.json there")
    document = load_json(checked_file(folder, "config.json"))
    if not isinstance(document, dict):
        raise OfflineConversionError(f"{path}: not a JSON object")
    stack: list[tuple[str, dict]] = [("", document)]
    while stack:
        prefix, section = stack.pop()
        for name, value in section.items():
            if name == "model_type" and not isinstance(value, str):
                raise OfflineConversionError(f"{path}: field {prefix}model_type is {value!r}, not a string")
            if isinstance(value, dict):
                stack.append((f"{prefix}{name}.", value))
    return path


def _config_fields(config: Any, value: int) -> list[str]:
    """The fields of ``config`` (sub-configs included, dotted) whose value is ``value``."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", config.to_dict())]
    while stack:
        prefix, section = stack.pop()
        for name, item in section.items():
            if isinstance(item, dict):
                stack.append((f"{prefix}{name}.", item))
            elif isinstance(item, int) and not isinstance(item, bool) and item == value:
                found.append(prefix + name)
    return sorted(found)


def _suffix_index(keys: list[str]) -> dict[str, list[str]]:
    """Every dotted suffix of every key -> the keys that end with it."""
    index: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        for start in range(len(parts)):
            index.setdefault(".".join(parts[start:]), []).append(key)
    return index


def _held_as(spec: FusedSpec, suffixes: dict[str, list[str]]) -> str | None:
    """The checkpoint key of ``spec``'s fused tensor, matched on the key from its layer number on
    (the checkpoint may add or drop a wrapper's prefix); ``None`` when there is none or no single one."""
    parts = spec.key.split(".")
    numbers = [index for index, part in enumerate(parts) if part.isdigit()]
    start = max(numbers[-1] - 1, 0) if numbers else len(parts) - len(spec.tail.split("."))
    held = suffixes.get(".".join(parts[start:]), [])
    return held[0] if len(held) == 1 else None


def _check_config_fits(specs: dict[str, FusedSpec], checkpoint: Checkpoint, config: Any, config_path: Path) -> None:
    """Refuse a config whose fused tensors disagree with the checkpoint before the model is
    converted (one module per expert: a config giving 200000 experts would exhaust memory
    first).  A fused tensor the checkpoint holds must have the model's shape (or its last two
    dimensions swapped); per-expert tensors must reach the model's last expert.  The error
    names the config fields that give the disagreeing size and the checkpoint file."""
    suffixes = _suffix_index(list(checkpoint.tensors))
    expert_indices: dict[str, int] = {}
    for key in checkpoint.tensors:
        parts = key.split(".")
        for position in range(len(parts) - 1):
            if parts[position + 1].isdigit():
                leaf = parts[position]
                expert_indices[leaf] = max(expert_indices.get(leaf, -1), int(parts[position + 1]))

    def refuse(model_size: int, held: str, what: str) -> OfflineConversionError:
        fields = _config_fields(config, model_size)
        named = " / ".join(f"{field} = {model_size}" for field in fields) if fields else f"a size of {model_size}"
        return OfflineConversionError(f"{config_path}: {named} does not fit the checkpoint: {held} {what}")

    for spec in specs.values():
        held_key = _held_as(spec, suffixes)
        if held_key is not None:
            entry, shape = checkpoint.tensors[held_key], tuple(spec.shape)
            swapped = (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else shape
            if entry.shape in (shape, swapped):
                continue
            differs = next((ours for ours, theirs in zip(shape, entry.shape, strict=False) if ours != theirs), shape[0])
            raise refuse(
                differs,
                checkpoint.shard_of[held_key],
                f"holds {held_key!r} as {list(entry.shape)}, the model of config.json needs {list(shape)}",
            )
        if spec.role == "dense":
            continue
        layout = spec.layout
        experts = layout.num_experts if isinstance(layout, ExpertsLayout) else spec.shape[0]
        leaf = spec.path.rsplit(".", 1)[-1]
        found = expert_indices.get(leaf)
        if found is not None and found + 1 < experts:
            raise refuse(
                experts,
                f"{checkpoint.folder}",
                f"holds {leaf}.0 to {leaf}.{found} only, the model of config.json has {experts} of them",
            )


def _planned_output(name: str, dtype: str, shape: tuple[int, ...]) -> OutputTensor:
    return OutputTensor(name, dtype, shape, math.prod(shape) * DTYPE_SIZES[dtype])


def _check_splittable(entry: TensorEntry, what: str) -> None:
    if entry.dtype not in DTYPE_SIZES:
        raise OfflineConversionError(
            f"{entry.file.name}: {what} {entry.name!r} has dtype {entry.dtype}, which cannot be split"
        )


def _split_step(entry: TensorEntry, spec: FusedSpec, model: ModelLayout, to_checkpoint: Callable[[str], str]) -> Step:
    _check_splittable(entry, "fused tensor")
    shape = tuple(spec.shape)
    # Some checkpoints store stacked expert weights transposed (Qwen3-VL-MoE); transformers
    # transposes them on load when the shapes differ, and so does this (equal shapes: as they are).
    weight = spec.role in ("gate_up", "gate", "up", "down", "parallel") and len(shape) == 3
    if entry.shape == shape:
        transposed = False
    elif weight and entry.shape == (*shape[:-2], shape[-1], shape[-2]):
        transposed = True
    else:
        raise OfflineConversionError(
            f"{entry.file.name}: fused tensor {entry.name!r} is {list(entry.shape)}, the model built from "
            f"config.json expects {list(shape)}"
        )
    outputs = tuple(
        _planned_output(to_checkpoint(model.saved_name(name)), entry.dtype, shape)
        for name, shape in model.pieces[spec.key]
    )
    identity = spec.identity_elements
    ranges = spec.piece_ranges(DTYPE_SIZES[entry.dtype], transposed)
    if ranges is not None and [count for _, count in ranges] != [output.nbytes for output in outputs]:
        ranges = None  # cannot happen (describe_model_layout checked the shapes); decoding checks again
    return Step(
        "split",
        (entry.name,),
        outputs,
        fused_key=spec.key,
        transposed=transposed,
        identity_elements=identity,
        ranges=ranges,
    )


def _join_step(
    checkpoint: Checkpoint, spec: FusedSpec, model: ModelLayout, to_checkpoint: Callable[[str], str]
) -> Step:
    sources = []
    dtypes = set()
    for name, shape in model.pieces[spec.key]:
        # A per-expert checkpoint names a piece as save_pretrained does or as the converted
        # model's state dict does (older defuser convert results): either, never both.
        held = [key for key in map(to_checkpoint, model.names_of(name)) if key in checkpoint.tensors]
        if len(held) > 1:
            raise OfflineConversionError(
                f"{checkpoint.folder}: holds the same per-expert tensor twice, as {held[0]!r} and {held[1]!r}"
            )
        if not held:
            names = " or ".join(repr(key) for key in map(to_checkpoint, model.names_of(name)))
            raise OfflineConversionError(
                f"{checkpoint.folder}: per-expert tensor {names} is missing, so {to_checkpoint(spec.key)!r} "
                "cannot be rebuilt"
            )
        key = held[0]
        entry = checkpoint.tensors[key]
        if entry.shape != shape:
            raise OfflineConversionError(
                f"{checkpoint.shard_of[key]}: per-expert tensor {key!r} is {list(entry.shape)}, expected {list(shape)}"
            )
        _check_splittable(entry, "per-expert tensor")
        sources.append(key)
        dtypes.add(entry.dtype)
    if len(dtypes) != 1:
        raise OfflineConversionError(
            f"{checkpoint.folder}: the pieces of {to_checkpoint(spec.key)!r} mix dtypes {sorted(dtypes)}"
        )
    output = _planned_output(to_checkpoint(spec.key), dtypes.pop(), tuple(spec.shape))
    ranges = spec.piece_ranges(DTYPE_SIZES[output.dtype])
    # Byte ranges when the pieces, in order, tile the fused tensor from its start (no identity rows).
    if ranges is not None:
        tiled = [offset for offset, _ in ranges] == [sum(c for _, c in ranges[:i]) for i in range(len(ranges))]
        counts = [count for _, count in ranges] == [checkpoint.tensors[key].nbytes for key in sources]
        if not (tiled and counts and sum(c for _, c in ranges) == output.nbytes):
            ranges = None
    return Step(
        "join",
        tuple(sources),
        (output,),
        fused_key=spec.key,
        identity_elements=spec.identity_elements,
        ranges=ranges,
    )


# -- the plan in words --------------------------------------------------------------------


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _fused_tensor(step: Step, checkpoint: Checkpoint) -> TensorEntry | OutputTensor:
    """The fused tensor of a split (read) or join (written) step."""
    return checkpoint.tensors[step.sources[0]] if step.kind == "split" else step.outputs[0]


def format_plan(plan: ConversionPlan) -> str:
    """A short human-readable account of ``plan``: fused tensors split (or joined) per layer
    pattern with sizes, what is copied, the output shards and the files copied."""
    checkpoint = plan.checkpoint
    direction = "per-expert -> fused" if plan.reverse else "fused -> per-expert"
    lines = [
        f"{plan.source} -> {plan.destination} ({direction})",
        f"model: {plan.model_class} ({plan.model_type}), built on the meta device from config.json",
        f"source: {len(checkpoint.shards)} shard(s), {len(checkpoint.tensors):,} tensors, {_size(checkpoint.nbytes)}",
    ]
    if plan.prefixes != ("", ""):
        source_prefix, model_prefix = plan.prefixes
        lines.append(f"checkpoint keys start with {source_prefix!r} where the model's start with {model_prefix!r}")
    copies = [step for step in plan.steps if step.kind == "copy"]
    fused = [step for step in plan.steps if step.kind != "copy"]
    groups: dict[tuple[str, str], list[Step]] = {}
    for step in fused:
        pattern = _LAYER_NUMBER.sub("*", _fused_tensor(step, checkpoint).name)
        groups.setdefault((step.kind, pattern), []).append(step)
    rows = []
    for (kind, pattern), steps in groups.items():
        first = steps[0]
        tensor = _fused_tensor(first, checkpoint)
        shape = "x".join(map(str, tensor.shape)) + (" (stored transposed)" if first.transposed else "")
        how = "byte ranges" if all(step.ranges is not None for step in steps) else "decoded"
        arrow = f"{'->' if kind == 'split' else '<-'} {first.piece_count} tensors each ({how})"
        rows.append((kind, pattern, f"x{len(steps)}", tensor.dtype, shape, _size(tensor.nbytes) + " each", arrow))
    if rows:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    pieces = sum(step.piece_count for step in fused)
    if plan.reverse:
        changed = f"joined: {pieces:,} per-expert tensors into {len(fused):,} fused tensors"
    else:
        changed = f"split: {len(fused):,} fused tensors into {pieces:,} per-expert tensors"
    copied = _size(sum(step.outputs[0].nbytes for step in copies))
    lines.append(f"{changed}; copied unchanged: {len(copies):,} tensors ({copied})")
    identity = sum(step.identity_elements for step in fused)
    if identity:
        what = "filled with zeros" if plan.reverse else "left out (the forward never reads them)"
        lines.append(f"identity-expert rows of the fused tensors: {identity:,} elements {what}")
    count = sum(len(shard.tensors) for shard in plan.shards)
    shard_names = ", ".join(f"{shard.name} ({_size(shard.nbytes)})" for shard in plan.shards[:3])
    more = f", ... ({len(plan.shards)} shards)" if len(plan.shards) > 3 else ""
    index = f" + {INDEX_NAME}" if len(plan.shards) > 1 else ""
    lines.append(f"output: {count:,} tensors, {_size(plan.nbytes)} in {shard_names}{more}{index}")
    lines.append(f"other files copied: {', '.join(plan.files) if plan.files else 'none'}")
    if plan.overwrite and plan.destination.is_dir():
        lines.append(f"replaces: {plan.destination} (its present content is removed once the result is in place)")
    if plan.skipped:
        lines.append(f"weight files left out (not part of the safetensors checkpoint): {', '.join(plan.skipped)}")
    return "\n".join(lines)
