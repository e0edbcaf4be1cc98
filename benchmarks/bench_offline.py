"""Peak memory and speed of ``defuser convert`` on a checkpoint of several GB, one JSON line.

    python benchmarks/bench_offline.py --gigabytes 3 [--reverse] [--workdir /tmp] [--keep]

Writes a sharded bf16 qwen3_moe checkpoint with random weights in the fused layout (64 experts,
hidden 2048, expert width 768, as many layers as the size asks), one shard at a time with
safetensors, so building it never holds more than one shard.  Then runs ``defuser convert`` in a
subprocess and prints: model bytes, the largest tensor's bytes, the convert process's peak RSS
(``ru_maxrss`` of the waited child), the peak RSS and seconds of a ``--dry-run`` of the same
conversion (imports, meta model and plan: the constant part), seconds and MB/s (whole command,
and with the dry run's seconds taken off), and a spot check that expert 0's per-expert weights
equal the slices of the fused ones.  ``--reverse`` also converts the result
back and checks it byte for byte against the source.
"""

from __future__ import annotations

import argparse
import json
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


def _defuser(*args: str) -> tuple[float, int]:
    """Run ``defuser`` in a subprocess; returns (seconds, peak RSS bytes of that process)."""
    binary = Path(sys.executable).parent / "defuser"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "defuser.cli"]
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, report.name, *command, "--quiet", *args], capture_output=True, text=True
        )
        figures = report.read().split()
    if done.returncode != 0 or not figures or figures[0] != "0":
        raise SystemExit(f"defuser {' '.join(args)} failed:\n{done.stderr}")
    return float(figures[1]), int(figures[2]) * 1024


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


def main() -> None:
    """Build the checkpoint, convert it, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=3.0, help="approximate checkpoint size")
    parser.add_argument("--workdir", default=None, help="where to build (default: a new folder in the temp dir)")
    parser.add_argument("--reverse", action="store_true", help="also convert back and compare byte for byte")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="defuser-bench-offline-", dir=args.workdir))
    try:
        source, result, back = workdir / "fused", workdir / "per_expert", workdir / "back"
        started = time.perf_counter()
        model_bytes, largest = _write_checkpoint(source, args.gigabytes)
        build_seconds = time.perf_counter() - started
        # Each measurement needs its own process: ru_maxrss of children is the largest so far.
        plan_seconds, plan_rss = _defuser("convert", str(source), str(result), "--dry-run")
        seconds, peak_rss = _defuser("convert", str(source), str(result))
        figures = {
            "model_bytes": model_bytes,
            "largest_tensor_bytes": largest,
            "shards": len(list(source.glob("*.safetensors"))),
            "peak_rss_bytes": peak_rss,
            "dry_run_rss_bytes": plan_rss,
            "peak_rss_minus_dry_run_over_largest_tensor": round((peak_rss - plan_rss) / largest, 3),
            "seconds": round(seconds, 2),
            "dry_run_seconds": round(plan_seconds, 2),
            "mb_per_s": round(model_bytes / 1e6 / seconds, 1),
            "mb_per_s_after_planning": round(model_bytes / 1e6 / max(seconds - plan_seconds, 1e-9), 1),
            "build_seconds": round(build_seconds, 1),
            "spot_check": _spot_check(source, result),
        }
        if args.reverse:
            reverse_seconds, reverse_rss = _defuser("convert", str(result), str(back), "--reverse")
            figures["reverse"] = {
                "peak_rss_bytes": reverse_rss,
                "seconds": round(reverse_seconds, 2),
                "mb_per_s": round(model_bytes / 1e6 / reverse_seconds, 1),
                "byte_identical": _same_tensors(source, back),
            }
        print(json.dumps(figures))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
