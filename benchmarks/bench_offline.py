"""Speed and peak memory of ``defuser convert`` beside a plain copy of the same folder, one JSON
line per case.

    python benchmarks/bench_offline.py --gigabytes 2 [--jobs 1 2] [--reverse] [--workdir /tmp] [--keep]

Writes a sharded bf16 qwen3_moe checkpoint with random weights in the fused layout (64 experts,
hidden 2048, expert width 768, as many layers as the size asks), one shard at a time with
safetensors, so building it never holds more than one shard.  Then, each in its own process:

- ``copy``: ``cp -r SRC DST && sync DST/* DST`` (the copied files flushed to disk, as the
  conversion flushes its shards), the floor any conversion is compared with, run again right
  before each conversion because the load of a shared machine drifts;
- ``convert`` once per ``--jobs`` value (default: 1 and the CPUs available): seconds in all,
  seconds after planning (what the command reports for writing, verifying and renaming; the
  rest is the interpreter, imports, the meta model and the plan), the ratio of the part after
  planning to the plain copy just before it, the jobs used and each job's peak RSS (a forked job counts the
  pages it shares with its parent as its own, so the figure added during the job is given too),
  the whole command's peak RSS (``ru_maxrss`` of the waited process tree), and a spot check that
  expert 0's per-expert weights equal the slices of the fused ones;
- with ``--reverse``, the result converted back, checked byte for byte against the source.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INNER, EXPERTS, VOCAB = 2048, 768, 64, 32000
SHARD_BYTES = 1 << 30


def _config(gigabytes: float):
    from transformers import Qwen3MoeConfig

    per_layer = 3 * EXPERTS * INNER * HIDDEN * 2  # gate_up + down, bf16
    layers = max(1, round(gigabytes * 1e9 / per_layer))
    return Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        moe_intermediate_size=INNER,
        num_experts=EXPERTS,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def _write_checkpoint(folder: Path, gigabytes: float) -> tuple[int, int]:
    """The fused checkpoint, shard by shard; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    from defuser.report import model_on_meta

    config = _config(gigabytes)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shapes = {name: tuple(t.shape) for name, t in model_on_meta(config).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, names in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.randn(shapes[name], generator=generator, dtype=torch.bfloat16) for name in names}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    sizes = [torch.Size(shape).numel() * 2 for shape in shapes.values()]
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(sizes), max(sizes)


# ru_maxrss of children is the largest of all children waited for so far, so each command runs
# under its own small parent that reports the figure of its single child.
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[2:]).returncode
seconds = time.perf_counter() - started
open(sys.argv[1], "w").write(f"{code} {seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def _measured(command: list[str]) -> tuple[float, int, str]:
    """Run ``command``; returns (seconds, peak RSS bytes of its process tree, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        done = subprocess.run([sys.executable, "-c", _MEASURE, report.name, *command], capture_output=True, text=True)
        figures = report.read().split()
    if done.returncode != 0 or not figures or figures[0] != "0":
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return float(figures[1]), int(figures[2]) * 1024, done.stdout


def _defuser(*args: str) -> tuple[float, int, str]:
    """Run ``defuser --quiet ARGS`` in a subprocess; returns (seconds, peak RSS bytes, stdout)."""
    binary = Path(sys.executable).parent / "defuser"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "defuser.cli"]
    return _measured([*command, "--quiet", *args])


def _load() -> float:
    """The 1-minute load average (the machine may be shared)."""
    return round(os.getloadavg()[0], 2)


_WROTE = re.compile(
    r"^jobs: (\d+), ([0-9.]+) s; peak RSS per job, MiB \(\+ added during the job\): (.*)$", re.MULTILINE
)


def _convert_case(source: Path, result: Path, jobs: int, copy_seconds: float, largest: int) -> dict:
    """One conversion with ``jobs`` jobs, measured."""
    seconds, peak_rss, out = _defuser("convert", str(source), str(result), "--jobs", str(jobs))
    match = _WROTE.search(out)
    if match is None:
        raise SystemExit(f"defuser convert printed no timing line:\n{out[-2000:]}")
    after = float(match.group(2))
    per_job = [re.match(r"(\d+) \(\+(-?\d+)\)", item.strip()) for item in match.group(3).split(",")]
    return {
        "case": "convert",
        "jobs": int(match.group(1)),
        "seconds": round(seconds, 2),
        "planning_seconds": round(seconds - after, 2),
        "after_planning_seconds": round(after, 2),
        "after_planning_over_copy": round(after / copy_seconds, 2),
        "total_over_copy": round(seconds / copy_seconds, 2),
        "peak_rss_mib_per_job": [int(m.group(1)) for m in per_job if m],
        "rss_added_in_job_mib": [int(m.group(2)) for m in per_job if m],
        "largest_tensor_mib": round(largest / (1 << 20)),
        "peak_rss_mib_whole_command": round(peak_rss / (1 << 20)),
        "load_1min": _load(),
    }


def _weight_map(folder: Path) -> dict[str, str]:
    """Key -> shard file of a checkpoint folder (sharded with an index, or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def _spot_check(source: Path, result: Path) -> bool:
    """Expert 0's gate, up and down of layer 0 equal the slices of the fused tensors."""
    from safetensors import safe_open

    def tensor(folder: Path, key: str):
        with safe_open(folder / _weight_map(folder)[key], "pt") as handle:
            return handle.get_tensor(key)

    prefix = "model.layers.0.mlp.experts"
    gate_up, down = tensor(source, f"{prefix}.gate_up_proj")[0], tensor(source, f"{prefix}.down_proj")[0]
    return (
        tensor(result, f"{prefix}.0.gate_proj.weight").equal(gate_up[:INNER])
        and tensor(result, f"{prefix}.0.up_proj.weight").equal(gate_up[INNER:])
        and tensor(result, f"{prefix}.0.down_proj.weight").equal(down)
    )


def _same_tensors(first: Path, second: Path) -> bool:
    """Both checkpoints hold the same keys with the same bytes (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    first_map, second_map = _weight_map(first), _weight_map(second)
    if first_map.keys() != second_map.keys():
        return False
    for key in first_map:
        with safe_open(first / first_map[key], "pt") as a, safe_open(second / second_map[key], "pt") as b:
            if not a.get_tensor(key).view(-1).view(torch.uint8).equal(b.get_tensor(key).view(-1).view(torch.uint8)):
                return False
    return True


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> None:
    """Build the checkpoint, copy it, convert it, print one JSON line per case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=3.0, help="approximate checkpoint size")
    parser.add_argument("--workdir", default=None, help="where to build (default: a new folder in the temp dir)")
    parser.add_argument("--reverse", action="store_true", help="also convert back and compare byte for byte")
    parser.add_argument("--jobs", type=int, nargs="+", help="job counts to convert with (default: 1 and the CPUs)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="defuser-bench-offline-", dir=args.workdir))
    try:
        source, result, back, copied = workdir / "fused", workdir / "per_expert", workdir / "back", workdir / "copy"
        started = time.perf_counter()
        model_bytes, largest = _write_checkpoint(source, args.gigabytes)
        build_seconds = time.perf_counter() - started
        common = {"model_bytes": model_bytes, "shards": len(list(source.glob("*.safetensors"))), "cpus": os.cpu_count()}
        subprocess.run(["sync"], check=True)  # the build's dirty pages are not the copy's to write

        def copy_case() -> float:
            """``cp -r`` then fsync of the copied files (``sync FILE...``): what the conversion
            does to its own files; a bare ``sync`` would also wait for other processes' writes."""
            seconds, _, _ = _measured(["sh", "-c", f"cp -r '{source}' '{copied}' && sync '{copied}'/* '{copied}'"])
            shutil.rmtree(copied)
            copy = {"case": "copy", "command": "cp -r SRC DST && sync DST/* DST", **common}
            figures = {"seconds": round(seconds, 2), "load_1min": _load(), "build_seconds": round(build_seconds, 1)}
            print(json.dumps({**copy, **figures}), flush=True)
            return seconds

        for jobs in args.jobs or sorted({1, _cpus()}):
            # Each conversion right after its own plain copy: a shared machine's load drifts.
            copy_seconds = copy_case()
            figures = _convert_case(source, result, jobs, copy_seconds, largest)
            figures["spot_check"] = _spot_check(source, result)
            print(json.dumps({**figures, **common}), flush=True)
            if args.reverse and jobs == (args.jobs or [_cpus()])[-1]:
                reverse_seconds, reverse_rss, _ = _defuser("convert", str(result), str(back), "--reverse")
                print(
                    json.dumps(
                        {
                            "case": "reverse",
                            **common,
                            "seconds": round(reverse_seconds, 2),
                            "peak_rss_mib_whole_command": round(reverse_rss / (1 << 20)),
                            "byte_identical": _same_tensors(source, back),
                            "load_1min": _load(),
                        }
                    ),
                    flush=True,
                )
                shutil.rmtree(back)
            shutil.rmtree(result)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
