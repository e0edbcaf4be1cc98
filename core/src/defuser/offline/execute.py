"""Carrying out a plan: every shard is streamed into a temporary folder beside the destination
(peak memory one fused tensor plus one expert's slice), the index and the other files are
added, the written headers are checked against the plan and the source's element counts, and
only then is the folder renamed into place.  Anything that stops it, SIGTERM included, removes
the temporary folder and leaves the destination as it was; what SIGKILL leaves behind is
removed by the next run (:mod:`defuser.offline.workspace`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from defuser.offline.checkpoint import INDEX_NAME, Checkpoint, check_destination, checked_file
from defuser.offline.plan import ConversionPlan, Step, plan_conversion
from defuser.offline.safetensors_io import (
    OfflineConversionError,
    ShardWriter,
    TensorEntry,
    read_safetensors_header,
    read_tensor,
    same_width_int,
    written_to,
)
from defuser.offline.workspace import Workspace, remove_stale_workspaces

__all__ = ["ConversionReport", "convert_checkpoint", "execute_plan"]

logger = logging.getLogger(__name__)

_COPY_CHUNK = 32 << 20


@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` did."""

    plan: ConversionPlan
    written: bool
    seconds: float = 0.0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so a killed run still removes its temp folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Sources:
    """Open source shards (plain file handles, opened once) and a reusable copy buffer."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._handles: dict[str, BinaryIO] = {}
        self.buffer = torch.empty(_COPY_CHUNK, dtype=torch.uint8)

    def handle(self, key: str) -> BinaryIO:
        shard = self.checkpoint.shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = open(self.checkpoint.folder / shard, "rb")  # closed by close()
        return self._handles[shard]

    def read(self, key: str) -> torch.Tensor:
        return read_tensor(self.handle(key), self.checkpoint.tensors[key])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


def _run_step(
    step: Step, plan: ConversionPlan, sources: _Sources, writer: ShardWriter, nonzero_identity: list[str]
) -> Iterator[int]:
    """Write one step's tensors; yields byte counts as they are written.  A split whose dropped
    identity rows hold anything but zeros adds its source key to ``nonzero_identity``."""
    if step.kind == "copy":
        entry = plan.checkpoint.tensors[step.sources[0]]
        yield from writer.copy(entry, sources.handle(entry.name), sources.buffer, step.outputs[0].name)
        return
    spec = plan.layout.specs[step.fused_key]
    if step.kind == "split":
        fused = sources.read(step.sources[0])
        if step.transposed:
            fused = fused.transpose(-1, -2)
        if spec.identity_rows and bool(fused[spec.layout.num_experts :].any()):
            nonzero_identity.append(step.sources[0])
        for output, (_, piece) in zip(step.outputs, spec.pieces(fused), strict=True):
            yield writer.write(output.name, piece)
        del fused
        return
    names = [name for name, _ in plan.layout.pieces[spec.key]]
    by_name = dict(zip(names, step.sources, strict=True))  # sources are in piece order, under either name
    out = torch.empty(spec.shape, dtype=same_width_int(step.outputs[0].dtype))
    spec.join(out, lambda name: sources.read(by_name[name]))
    yield writer.write(step.outputs[0].name, out)


def _write_shards(plan: ConversionPlan, folder: Path, progress: tqdm) -> None:
    sources = _Sources(plan.checkpoint)
    nonzero_identity: list[str] = []
    try:
        for number, shard in enumerate(plan.shards, 1):
            progress.set_description(f"shard {number}/{len(plan.shards)}")
            writer = ShardWriter(folder / shard.name, shard.tensors, shard.metadata)
            try:
                for step in shard.steps:
                    for count in _run_step(step, plan, sources, writer, nonzero_identity):
                        progress.update(count)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        sources.close()
    if nonzero_identity:
        # Not an error: convert_model drops these rows too, and no forward reads them.
        logger.warning(
            "%d fused tensor(s) hold non-zero identity-expert rows, which are left out (first: %r); "
            "--reverse writes zeros there",
            len(nonzero_identity),
            nonzero_identity[0],
        )


def _write_index(plan: ConversionPlan, folder: Path) -> None:
    if len(plan.shards) < 2:
        return
    metadata = dict(plan.index_metadata or {})
    metadata["total_size"] = plan.nbytes
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(tensor.numel for shard in plan.shards for tensor in shard.tensors)
    weight_map = {tensor.name: shard.name for shard in plan.shards for tensor in shard.tensors}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    with written_to(folder / INDEX_NAME):
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _copy_files(plan: ConversionPlan, folder: Path) -> None:
    for relative in plan.files:
        # Checked again here: the plan was made earlier, and the file may have changed since.
        source = checked_file(plan.source, relative).resolve()
        target = folder / relative
        with written_to(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _verify(plan: ConversionPlan, folder: Path) -> None:
    """Read the written headers back and check that they hold exactly the planned tensors and
    that every source tensor's elements are accounted for."""
    written: dict[str, TensorEntry] = {}
    for shard in plan.shards:
        entries, _ = read_safetensors_header(folder / shard.name)
        planned = {tensor.name: tensor for tensor in shard.tensors}
        if entries.keys() != planned.keys():
            extra = sorted(entries.keys() ^ planned.keys())
            raise OfflineConversionError(f"{shard.name}: written tensors differ from the plan ({extra[0]!r})")
        for name, entry in entries.items():
            if (entry.dtype, entry.shape) != (planned[name].dtype, planned[name].shape):
                raise OfflineConversionError(f"{shard.name}: {name!r} was written as {entry.dtype} {list(entry.shape)}")
        written.update(entries)
    accounted: list[str] = []
    identity = 0  # identity-expert elements: dropped by splits (-), zero rows added by joins (+)
    for step in plan.steps:
        source = sum(plan.checkpoint.tensors[key].numel for key in step.sources)
        result = sum(written[tensor.name].numel for tensor in step.outputs)
        change = {"split": -step.identity_elements, "join": step.identity_elements}.get(step.kind, 0)
        if source + change != result:
            dropped = f" ({abs(change)} of them identity-expert rows)" if change else ""
            raise OfflineConversionError(f"{step.sources[0]!r}: {source} elements read{dropped}, {result} written")
        identity += change
        accounted += step.sources
    missing = plan.checkpoint.tensors.keys() - set(accounted)
    if missing or len(accounted) != len(plan.checkpoint.tensors):
        what = f"{sorted(missing)[0]!r} is not written" if missing else "a tensor is written twice"
        raise OfflineConversionError(f"{plan.destination}: {what}")
    if sum(e.numel for e in written.values()) != sum(e.numel for e in plan.checkpoint.tensors.values()) + identity:
        raise OfflineConversionError(f"{plan.destination}: element counts of source and result differ")


def execute_plan(plan: ConversionPlan, progress: bool | None = None) -> float:
    """Carry out ``plan``: write every shard into a temporary folder beside the destination,
    write the index (more than one shard) and the non-weight files, verify, then move the
    folder into place (replacing an old destination only when the plan allows it, atomically
    where the system can; see :mod:`defuser.offline.workspace`).  Anything that stops it, an
    interrupt included, removes the temporary folder and leaves the destination as it was;
    temporary folders of earlier runs that were killed are removed first.  Returns the seconds
    it took.  ``progress=None`` shows a tqdm bar on a terminal."""
    started = time.perf_counter()
    check_destination(plan.source, plan.destination, plan.overwrite)
    parent = plan.destination.resolve().parent
    remove_stale_workspaces(parent)
    free = shutil.disk_usage(parent).free
    if free < plan.nbytes:
        raise OfflineConversionError(f"{parent}: {free:,} bytes free, the result needs {plan.nbytes:,}")
    if plan.layout is None:
        raise OfflineConversionError("the plan carries no model layout (make it with plan_conversion)")
    with Workspace(parent, plan.destination) as workspace, _terminate_as_interrupt():
        disable = None if progress is None else not progress
        with tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=disable) as bar:
            _write_shards(plan, workspace.folder, bar)
        _write_index(plan, workspace.folder)
        _copy_files(plan, workspace.folder)
        _verify(plan, workspace.folder)
        workspace.install()
    seconds = time.perf_counter() - started
    logger.info("wrote %s: %d shard(s), %d bytes in %.1f s", plan.destination, len(plan.shards), plan.nbytes, seconds)
    return seconds


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    reverse: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ConversionReport:
    """Convert the safetensors checkpoint in ``source`` from the fused layout to the per-expert
    layout that ``convert_model`` gives, under transformers' stock per-expert names where it has
    them (``reverse=True``: back to fused, from either naming) into the new folder ``destination``,
    tensor by tensor; ``dry_run`` only plans.  See :func:`plan_conversion` for
    the checks and :func:`execute_plan` for the writing."""
    plan = plan_conversion(source, destination, reverse=reverse, overwrite=overwrite)
    if dry_run:
        return ConversionReport(plan, written=False)
    return ConversionReport(plan, written=True, seconds=execute_plan(plan, progress=progress))
