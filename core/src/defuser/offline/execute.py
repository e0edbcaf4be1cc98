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
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from defuser.offline.checkpoint import INDEX_NAME, Checkpoint, check_destination, checked_file
from defuser.offline.parts import MANIFEST_NAME, Part, find_parts, manifest, part_folder, part_shards, read_manifest
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

__all__ = ["ConversionReport", "ExecutionReport", "carry_out", "convert_checkpoint", "execute_plan", "merge_parts"]

logger = logging.getLogger(__name__)


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
    """Open source shards: plain file handles, opened once per process."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._handles: dict[str, BinaryIO] = {}

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
        yield writer.copy(entry, sources.handle(entry.name), step.outputs[0].name)
        return
    if step.kind == "split" and step.ranges is not None:
        # Every piece is a contiguous byte range of the stored fused tensor: no decoding.
        entry = plan.checkpoint.tensors[step.sources[0]]
        handle = sources.handle(entry.name)
        for output, (offset, count) in zip(step.outputs, step.ranges, strict=True):
            yield writer.copy_range(output.name, handle, entry.start + offset, count)
        return
    if step.kind == "join" and step.ranges is not None:
        # The pieces' bytes one after the other are the fused tensor's: no decoding.
        parts = [
            (sources.handle(key), plan.checkpoint.tensors[key].start, plan.checkpoint.tensors[key].nbytes)
            for key in step.sources
        ]
        yield writer.copy_ranges(step.outputs[0].name, parts)
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


@dataclass
class _JobResult:
    """What writing one shard gave: its index, bytes, the fused tensors with non-zero identity
    rows, and the memory of the process that wrote it."""

    shard: int
    nbytes: int
    nonzero_identity: list[str]
    pid: int
    rss_at_start: int
    peak_rss: int


def _memory() -> tuple[int, int]:
    """``(resident bytes now, peak resident bytes)`` of this process (``/proc``; else ``ru_maxrss``)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak << 10
        return peak, peak


def _write_shard(plan: ConversionPlan, index: int, folder: Path, progress: tqdm | None = None) -> _JobResult:
    """Write output shard ``index`` of ``plan`` into ``folder``: one job's work."""
    rss_at_start, _ = _memory()
    shard = plan.shards[index]
    sources = _Sources(plan.checkpoint)
    nonzero_identity: list[str] = []
    try:
        writer = ShardWriter(folder / shard.name, shard.tensors, shard.metadata)
        try:
            for step in shard.steps:
                for count in _run_step(step, plan, sources, writer, nonzero_identity):
                    if progress is not None:
                        progress.update(count)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        sources.close()
    return _JobResult(index, shard.nbytes, nonzero_identity, os.getpid(), rss_at_start, _memory()[1])


def _job_main(plan: ConversionPlan, folder: Path, indices: list[int], connection: Connection) -> None:
    """A job process: write the shards ``indices``, sending ``("shard", result)`` after each and
    ``("done", None)`` at the end, or ``("error", exception)`` for the first failure."""
    torch.set_num_threads(1)  # a job decodes one tensor at a time; the jobs are the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the jobs and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped by the parent: at once
    try:
        for index in indices:
            connection.send(("shard", _write_shard(plan, index, folder)))
        connection.send(("done", None))
    except BaseException as error:
        try:
            connection.send(("error", error))
        except Exception:  # an exception that does not pickle: its text then
            connection.send(("error", OfflineConversionError(f"{type(error).__name__}: {error}")))
    finally:
        connection.close()


def _job_context() -> multiprocessing.context.ForkContext | multiprocessing.context.SpawnContext:
    """fork where the system has it (no re-import: a job starts at once), else spawn."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _assign(plan: ConversionPlan, indices: list[int], jobs: int) -> list[list[int]]:
    """The shards ``indices`` dealt to ``jobs`` jobs, largest first to the least loaded job."""
    groups: list[list[int]] = [[] for _ in range(jobs)]
    loads = [0] * jobs
    for index in sorted(indices, key=lambda i: (-plan.shards[i].nbytes, i)):
        job = loads.index(min(loads))
        groups[job].append(index)
        loads[job] += plan.shards[index].nbytes
    return [sorted(group) for group in groups if group]


def _write_shards(
    plan: ConversionPlan, indices: list[int], folder: Path, progress: tqdm, jobs: int
) -> list[_JobResult]:
    """Write the output shards ``indices`` of ``plan`` into ``folder``, spread over up to
    ``jobs`` processes (one shard at a time in each, so each holds at most one fused tensor);
    every shard's bytes are the same whatever ``jobs``.  The first job to fail stops the others
    and its error is raised here."""
    results: list[_JobResult] = []
    jobs = min(jobs, len(indices))
    if jobs <= 1:
        for number, index in enumerate(indices, 1):
            progress.set_description(f"shard {number}/{len(indices)}")
            results.append(_write_shard(plan, index, folder, progress))
    else:
        progress.set_description(f"{len(indices)} shards, {jobs} jobs")
        context = _job_context()
        running: dict[Connection, multiprocessing.process.BaseProcess] = {}
        finished = False
        try:
            for group in _assign(plan, indices, jobs):
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_job_main, args=(plan, folder, group, sender), daemon=True)
                process.start()
                sender.close()  # the job holds the only sending end: its death reads as EOF
                running[receiver] = process
            pending = dict(running)
            while pending:
                ready = multiprocessing.connection.wait(list(pending))
                for receiver in [receiver for receiver in pending if receiver in ready]:
                    try:
                        kind, payload = receiver.recv()
                    except EOFError:
                        dead = pending[receiver]
                        dead.join()
                        raise OfflineConversionError(
                            f"{folder}: conversion job {dead.pid} ended without finishing its shards "
                            f"(exit code {dead.exitcode}; killed for memory?)"
                        ) from None
                    if kind == "error":
                        raise payload
                    if kind == "done":
                        del pending[receiver]
                    else:
                        progress.update(payload.nbytes)
                        results.append(payload)
            finished = True
        finally:
            for receiver, job in running.items():
                if not finished and job.is_alive():
                    job.terminate()  # before the temporary folder it writes into is removed
                job.join()
                receiver.close()
    nonzero_identity = [key for result in sorted(results, key=lambda r: r.shard) for key in result.nonzero_identity]
    if nonzero_identity:
        # Not an error: convert_model drops these rows too, and no forward reads them.
        logger.warning(
            "%d fused tensor(s) hold non-zero identity-expert rows, which are left out (first: %r); "
            "--reverse writes zeros there",
            len(nonzero_identity),
            nonzero_identity[0],
        )
    return sorted(results, key=lambda r: r.shard)


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


def _verify_headers(plan: ConversionPlan, indices: list[int], folder: Path) -> dict[str, TensorEntry]:
    """Read the written headers of the output shards ``indices`` back and check that they hold
    exactly the planned tensors; returns them by name."""
    written: dict[str, TensorEntry] = {}
    for shard in (plan.shards[index] for index in indices):
        entries, _ = read_safetensors_header(folder / shard.name)
        planned = {tensor.name: tensor for tensor in shard.tensors}
        if entries.keys() != planned.keys():
            extra = sorted(entries.keys() ^ planned.keys())
            raise OfflineConversionError(f"{shard.name}: written tensors differ from the plan ({extra[0]!r})")
        for name, entry in entries.items():
            if (entry.dtype, entry.shape) != (planned[name].dtype, planned[name].shape):
                raise OfflineConversionError(f"{shard.name}: {name!r} was written as {entry.dtype} {list(entry.shape)}")
        written.update(entries)
    return written


def _verify(plan: ConversionPlan, folder: Path) -> None:
    """Read the written headers back and check that they hold exactly the planned tensors and
    that every source tensor's elements are accounted for."""
    written = _verify_headers(plan, list(range(len(plan.shards))), folder)
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


@dataclass
class ExecutionReport:
    """What :func:`carry_out` did: the folder it wrote (the destination, or a part folder), the
    seconds, the job processes used and the memory of each (``(pid, resident bytes at its
    start, peak resident bytes)``; a forked job starts with the pages it shares with its parent
    counted as its own)."""

    folder: Path
    seconds: float
    jobs: int
    job_memory: list[tuple[int, int, int]] = field(default_factory=list)


def _prepare(plan: ConversionPlan, target: Path, nbytes: int) -> Path:
    """Checks before writing into ``target``; returns its parent after removing what killed runs left there."""
    check_destination(plan.source, target, plan.overwrite)
    parent = target.resolve().parent
    remove_stale_workspaces(parent)
    free = shutil.disk_usage(parent).free
    if free < nbytes:
        raise OfflineConversionError(f"{parent}: {free:,} bytes free, the result needs {nbytes:,}")
    if plan.layout is None:
        raise OfflineConversionError("the plan carries no model layout (make it with plan_conversion)")
    return parent


def carry_out(
    plan: ConversionPlan, progress: bool | None = None, jobs: int = 1, part: Part | None = None
) -> ExecutionReport:
    """Carry out ``plan``: write every output shard (``jobs`` processes at a time) into a
    temporary folder beside the destination, write the index (more than one shard) and the
    non-weight files, verify, then move the folder into place (replacing an old destination
    only when the plan allows it, atomically where the system can; see
    :mod:`defuser.offline.workspace`).  With ``part``, only that part's shards and a manifest go
    to the part folder beside the destination (:mod:`defuser.offline.parts`; :func:`merge_parts`
    makes the destination).  Anything that stops it, an interrupt included, removes the
    temporary folder and leaves the destination as it was; temporary folders of earlier runs
    that were killed are removed first.  ``progress=None`` shows a tqdm bar on a terminal."""
    started = time.perf_counter()
    if jobs < 1:
        raise OfflineConversionError(f"jobs must be 1 or more, got {jobs}")
    indices = part_shards(plan, part) if part is not None else list(range(len(plan.shards)))
    target = part_folder(plan.destination, part) if part is not None else plan.destination
    nbytes = sum(plan.shards[index].nbytes for index in indices)
    parent = _prepare(plan, target, nbytes)
    with Workspace(parent, target) as workspace, _terminate_as_interrupt():
        disable = None if progress is None else not progress
        with tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, disable=disable) as bar:
            results = _write_shards(plan, indices, workspace.folder, bar, jobs)
        if part is None:
            _write_index(plan, workspace.folder)
            _copy_files(plan, workspace.folder)
            _verify(plan, workspace.folder)
        else:
            _verify_headers(plan, indices, workspace.folder)
            with written_to(workspace.folder / MANIFEST_NAME):
                text = json.dumps(manifest(plan, part), indent=2) + "\n"
                (workspace.folder / MANIFEST_NAME).write_text(text)
        workspace.install()
    seconds = time.perf_counter() - started
    logger.info("wrote %s: %d shard(s), %d bytes in %.1f s", target, len(indices), nbytes, seconds)
    memory = sorted({(r.pid, r.rss_at_start, r.peak_rss) for r in results if r.pid != os.getpid()})
    if not memory:  # written here
        memory = [(os.getpid(), min((r.rss_at_start for r in results), default=0), _memory()[1])]
    return ExecutionReport(target, seconds, max(1, min(jobs, len(indices))), _merged_memory(memory))


def _merged_memory(memory: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """One row per process: the lowest start and the highest peak of its shards."""
    by_pid: dict[int, tuple[int, int, int]] = {}
    for pid, start, peak in memory:
        known = by_pid.get(pid, (pid, start, peak))
        by_pid[pid] = (pid, min(known[1], start), max(known[2], peak))
    return list(by_pid.values())


def execute_plan(plan: ConversionPlan, progress: bool | None = None, jobs: int = 1) -> float:
    """Carry out ``plan`` with :func:`carry_out` (every shard, ``jobs`` processes at a time);
    returns the seconds it took."""
    return carry_out(plan, progress=progress, jobs=jobs).seconds


def _gather(source: Path, target: Path) -> None:
    """``source`` as ``target``: a hard link where the file system allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def merge_parts(plan: ConversionPlan) -> ExecutionReport:
    """Make ``plan.destination`` from the part folders that ``carry_out(plan, part=...)`` wrote
    for every part (:func:`defuser.offline.parts.find_parts` refuses a missing part or one of
    another plan): their shards are linked (or copied) into a temporary folder with the index
    and the other files, the whole is verified as a single conversion would be, moved into
    place, and only then are the part folders removed.  A failure leaves them and the
    destination as they were."""
    started = time.perf_counter()
    parts = find_parts(plan)
    parent = _prepare(plan, plan.destination, 0)
    with Workspace(parent, plan.destination) as workspace, _terminate_as_interrupt():
        for number, folder in parts.items():
            for name in read_manifest(folder)["shards"]:
                with written_to(workspace.folder / name):
                    _gather(folder / name, workspace.folder / name)
            logger.debug("gathered part %d from %s", number, folder)
        _write_index(plan, workspace.folder)
        _copy_files(plan, workspace.folder)
        _verify(plan, workspace.folder)
        workspace.install()
    for folder in parts.values():
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - started
    logger.info("merged %d part(s) into %s in %.1f s", len(parts), plan.destination, seconds)
    return ExecutionReport(plan.destination, seconds, 1)


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    reverse: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    jobs: int = 1,
) -> ConversionReport:
    """Convert the safetensors checkpoint in ``source`` from the fused layout to the per-expert
    layout that ``convert_model`` gives, under transformers' stock per-expert names where it has
    them (``reverse=True``: back to fused, from either naming) into the new folder ``destination``,
    tensor by tensor, ``jobs`` output shards at a time; ``dry_run`` only plans.  See
    :func:`plan_conversion` for the checks and :func:`carry_out` for the writing."""
    plan = plan_conversion(source, destination, reverse=reverse, overwrite=overwrite)
    if dry_run:
        return ConversionReport(plan, written=False)
    return ConversionReport(plan, written=True, seconds=execute_plan(plan, progress=progress, jobs=jobs))
