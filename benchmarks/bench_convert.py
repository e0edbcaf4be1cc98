"""Conversion cost and forward speed of defused models, one JSON line per run.

    python benchmarks/bench_convert.py --model-type qwen3_moe --size medium --runs 5

Each run builds the model in a fresh subprocess (so peak RSS belongs to that run), converts
it with ``convert_model`` and prints: model bytes, conversion seconds, conversion time over
one clone of the expert weights (measured in the same process), the run-time self-check's own
time within the conversion (milliseconds and share; ``DEFUSER_VERIFY``), peak RSS during conversion
(above the interpreter's own, after returning the heap pages construction freed) over model
bytes (the baseline taken after one matmul at the model's expert shapes, so the matmul
library's one-time setup is not billed to the conversion; ``--cold-kernels`` bills it), RSS
growth during conversion, whether per-expert weights share the fused storage; ``--layers N``
sets the depth (default 2).  It then fuses the model back with ``fuse_model``
and times the fused forward (transformers' default experts implementation, and its eager
loop, on a copy) against a defused copy at 256 tokens and at 1 token, in turns within one
process (medians of the calls), and prints the ratios and the max output difference against
the eager fused model (the exact reference) and the default one.  The summary line gives the
medians over the runs and, for the ratios, their [min, max] range: each run is a new process,
and some forwards (gpt-oss's fused bf16 one on some CPUs) settle at different speeds in
different processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time

SIZES = {
    # 2 layers, 64 experts, top-k 8, as the medium size; "large" doubles hidden and I.
    "medium": {"hidden_size": 1024, "moe_intermediate_size": 512},
    "large": {"hidden_size": 2048, "moe_intermediate_size": 1024},
    # gpt-oss-20b's expert dimensions (hidden 2880, expert width 2880): one expert's gate-up
    # block is 33 MB in bf16, as in the released model; with --layers 1 the model is 3.2 GB.
    "real": {"hidden_size": 2880, "moe_intermediate_size": 2880},
}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples this process's RSS every millisecond while active."""

    def __enter__(self) -> _PeakRss:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``), so that RSS
    measured next counts live memory, not what model construction and the clone timing
    freed but the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed heap
        pass


def _config(model_type: str, size: str, layers: int = 2):
    from defuser.tiny import tiny_config

    dims = SIZES[size]
    hidden, inner = dims["hidden_size"], dims["moe_intermediate_size"]
    overrides = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_experts=64,
        num_local_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=inner,
        vocab_size=1024,
    )
    if model_type in ("mixtral", "gpt_oss"):
        overrides["intermediate_size"] = inner  # these name the expert width intermediate_size
    return tiny_config(model_type, **overrides)


def _interleaved_forwards(models: dict, inputs, rounds: int, budget_s: float = 6.0) -> dict:
    """Median seconds of one forward of each model, timed in turns (the order rotating every
    round) so that a change of machine load between them touches every model alike; stops
    early once ``budget_s`` is spent (at least 3 rounds)."""
    import torch

    names = list(models)
    times: dict = {name: [] for name in names}
    with torch.no_grad():
        for model in models.values():
            model(**inputs, use_cache=False)  # warm-up
        start = time.perf_counter()
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                begin = time.perf_counter()
                models[name](**inputs, use_cache=False)
                times[name].append(time.perf_counter() - begin)
            if round_index >= 2 and time.perf_counter() - start > budget_s:
                break
    return {name: statistics.median(values) for name, values in times.items()}


class _SelfCheckFigures(logging.Handler):
    """Collects the figures the self-check attaches to its log record (``defuser_selfcheck``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds = 0.0
        self.probes = 0

    def emit(self, record: logging.LogRecord) -> None:
        figures = getattr(record, "defuser_selfcheck", None)
        if figures is not None:
            self.seconds += figures["seconds"]
            self.probes += figures["probes"]


def _every_expert_probe_seconds(model) -> float:
    """Seconds of one self-check probe reaching every expert of the model's first fused experts
    module: the fused forward, the defusion (not installed) and the defused forward."""
    from defuser.api import find_candidates
    from defuser.engine.selfcheck import VERIFY_ALL, SelfCheck
    from defuser.plugins import get_plugin_manager

    manager = get_plugin_manager()
    candidate = next(c for c in find_candidates(model) if c.kind == "experts")
    check = SelfCheck(model, manager, VERIFY_ALL)
    start = time.perf_counter()
    probe = check.prepare(candidate)
    check.verify(candidate, probe, manager.defuse(candidate))
    return time.perf_counter() - start


def _warm_matmul_kernels(size: str, dtype) -> None:
    """One matmul per expert weight shape of ``size``: the CPU's matmul library (oneDNN for
    bf16) sets up about 5 MB once per process on its first product above a small size, which
    the tiny model's shapes stay below. That is a library's one-time cost, paid by any first
    forward too; ``--cold-kernels`` leaves it to the conversion instead."""
    import torch

    hidden, inner = SIZES[size]["hidden_size"], SIZES[size]["moe_intermediate_size"]
    for rows, columns in ((inner, hidden), (hidden, inner)):
        torch.nn.functional.linear(torch.zeros(1, columns, dtype=dtype), torch.zeros(rows, columns, dtype=dtype))


def one_run(
    model_type: str,
    size: str,
    dtype_name: str,
    forward: bool = True,
    cleanup_original: bool = False,
    layers: int = 2,
    warm_kernels: bool = True,
) -> dict:
    """Build, convert (measured), fuse back, then compare fused and defused forwards."""
    import torch

    from defuser import convert_model, fuse_model
    from defuser.api import find_candidates

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = _config(model_type, size, layers)
    # from_pretrained builds transformers' checkpoint-mapping table once per process (saving
    # after conversion consults it); a model made from a config has not, so build it here
    # instead of billing that one-time cost to the conversion.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping(model_type)
    # The modeling module and what it imports on first use are libraries too: a throwaway
    # tiny model of the same type loads them before the baseline is taken, and converting it
    # loads what defuser imports on first use (the engine's modules, the plugins).
    from defuser.tiny import build_tiny_model

    convert_model(build_tiny_model(model_type, dtype=dtype), cleanup_original=cleanup_original)
    if warm_kernels:
        _warm_matmul_kernels(size, dtype)
    _return_free_memory()
    baseline = _rss()  # the interpreter and libraries, before any weight exists
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    candidates = [c for c in find_candidates(model) if c.kind == "experts"]
    zero_copy = all(c.layout.zero_copy for c in candidates)
    expert_tensors = [p for c in candidates for p in c.module.parameters(recurse=False)]
    expert_bytes = sum(t.numel() * t.element_size() for t in expert_tensors)
    largest_fused = max(t.numel() * t.element_size() for t in expert_tensors)
    clone_times, clone_cpu_times = [], []
    for _ in range(3):
        start, start_cpu = time.perf_counter(), time.process_time()
        clones = [t.detach().clone() for t in expert_tensors]
        clone_times.append(time.perf_counter() - start)
        clone_cpu_times.append(time.process_time() - start_cpu)
        del clones
    clone_seconds = statistics.median(clone_times)
    clone_cpu_seconds = statistics.median(clone_cpu_times)
    # One expert's block of the largest fused tensor: what in-place relayout buffers.
    expert_block = largest_fused // candidates[0].layout.num_experts
    fused_storage = {t.untyped_storage().data_ptr() for t in expert_tensors}
    # Nothing here may keep the fused modules alive during conversion: the library releases
    # each one once it is replaced, and that is part of what is measured.
    del candidates, expert_tensors
    _return_free_memory()
    before = _rss()
    selfcheck = _SelfCheckFigures()
    defuser_logger = logging.getLogger("defuser")
    defuser_logger.addHandler(selfcheck)
    defuser_logger.setLevel(logging.DEBUG)
    with _PeakRss() as peak:
        start, start_cpu = time.perf_counter(), time.process_time()
        assert convert_model(model, cleanup_original=cleanup_original)
        convert_seconds = time.perf_counter() - start
        # Process CPU time (all threads, the sampler's too): less sensitive to other load.
        convert_cpu_seconds = time.process_time() - start_cpu
    defuser_logger.removeHandler(selfcheck)
    defuser_logger.setLevel(logging.NOTSET)
    shares = all(
        p.untyped_storage().data_ptr() in fused_storage
        for name, p in model.named_parameters()
        if ".experts." in name and name.rsplit(".", 2)[-2] in ("gate_proj", "up_proj", "down_proj")
    )

    conversion = {
        "model_type": model_type,
        "size": size,
        "layers": layers,
        "warm_kernels": warm_kernels,
        "dtype": dtype_name,
        "zero_copy_layout": zero_copy,
        "cleanup_original": cleanup_original,
        "model_bytes": model_bytes,
        "expert_bytes": expert_bytes,
        "largest_fused_tensor_bytes": largest_fused,
        "convert_s": convert_seconds,
        "clone_s": clone_seconds,
        "convert_over_clone": convert_seconds / clone_seconds,
        # The self-check's probe, inside the conversion time (one per class and layout).
        "selfcheck_probes": selfcheck.probes,
        "selfcheck_ms": selfcheck.seconds * 1e3,
        "selfcheck_share_of_convert": selfcheck.seconds / convert_seconds,
        "convert_cpu_s": convert_cpu_seconds,
        "clone_cpu_s": clone_cpu_seconds,
        "convert_over_clone_cpu": convert_cpu_seconds / clone_cpu_seconds,
        # Process memory beyond the interpreter baseline, at its peak during conversion.
        "peak_rss_over_model_bytes": (peak.peak - baseline) / model_bytes,
        "rss_growth_over_model_bytes": (peak.peak - before) / model_bytes,
        "rss_growth_over_largest_fused_tensor": (peak.peak - before) / largest_fused,
        "expert_block_bytes": expert_block,
        "rss_growth_bytes": peak.peak - before,
        "rss_growth_over_expert_block": (peak.peak - before) / expert_block,
        "shares_fused_storage": shares,
    }
    # Fused back (exact, tested): what a probe reaching every expert of one module costs
    # (DEFUSER_VERIFY=all does that for every module; the default probe reaches a spread of them).
    assert fuse_model(model)
    conversion["selfcheck_every_expert_ms"] = _every_expert_probe_seconds(model) * 1e3
    if not forward:
        return conversion

    # Forward comparison: the fused model with transformers' default experts implementation
    # (grouped_mm where torch offers it), a copy running its eager per-expert loop (the exact
    # reference) and a defused copy, timed in turns in this one process.
    import copy

    generator = torch.Generator().manual_seed(1)
    long_inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 256), generator=generator)}
    short_inputs = {"input_ids": long_inputs["input_ids"][:, :1]}
    default_implementation = model.config._experts_implementation
    eager = copy.deepcopy(model)
    eager.set_experts_implementation("eager")
    defused = copy.deepcopy(model)
    assert convert_model(defused)
    forms = {"fused": model, "eager": eager, "defused": defused}
    with torch.no_grad():
        default_reference = model(**long_inputs, use_cache=False).logits.float()
        reference = eager(**long_inputs, use_cache=False).logits.float()
        converted = defused(**long_inputs, use_cache=False).logits.float()
    long = _interleaved_forwards(forms, long_inputs, 7)
    short = _interleaved_forwards(forms, short_inputs, 25)
    fused_long, eager_long, defused_long = long["fused"], long["eager"], long["defused"]
    fused_short, eager_short, defused_short = short["fused"], short["eager"], short["defused"]
    return {
        **conversion,
        "fused_implementation": default_implementation,
        "fused_forward_256_s": fused_long,
        "eager_fused_forward_256_s": eager_long,
        "defused_forward_256_s": defused_long,
        "ratio_256": defused_long / fused_long,
        "ratio_256_vs_eager": defused_long / eager_long,
        "fused_forward_1_s": fused_short,
        "eager_fused_forward_1_s": eager_short,
        "defused_forward_1_s": defused_short,
        "ratio_1": defused_short / fused_short,
        "ratio_1_vs_eager": defused_short / eager_short,
        "max_abs_diff": (converted - reference).abs().max().item(),
        "max_abs_diff_vs_default": (converted - default_reference).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="qwen3_moe")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-forward", action="store_true", help="conversion figures only")
    parser.add_argument(
        "--cleanup-original", action="store_true", help="cleanup_original=True: copies release fused weights"
    )
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers (default 2): growth that follows the layers shows here"
    )
    parser.add_argument(
        "--cold-kernels",
        action="store_true",
        help="no matmul at the model's shapes before the baseline: the conversion's first one pays the library's setup",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be at least 1 (a model without decoder layers has no experts), got {args.layers}")
    if args.child:
        forward = not args.no_forward
        figures = one_run(
            args.model_type, args.size, args.dtype, forward, args.cleanup_original, args.layers, not args.cold_kernels
        )
        print(json.dumps(figures))
        return
    results = []
    for _ in range(args.runs):
        command = [sys.executable, __file__, "--child", "--model-type", args.model_type]
        command += ["--size", args.size, "--dtype", args.dtype] + (["--no-forward"] if args.no_forward else [])
        command += ["--cleanup-original"] if args.cleanup_original else []
        command += ["--layers", str(args.layers)] + (["--cold-kernels"] if args.cold_kernels else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(output, flush=True)
        results.append(json.loads(output))
    keys = [k for k, v in results[0].items() if isinstance(v, float)]
    summary = {"summary": "median", "model_type": args.model_type, "size": args.size, "layers": args.layers}
    summary["runs"] = len(results)
    summary["cleanup_original"] = args.cleanup_original
    summary["warm_kernels"] = results[0]["warm_kernels"]
    # Other work on the machine moves every absolute time: say how busy it was.
    summary["load_average_1min"] = os.getloadavg()[0]
    summary["cpu_count"] = os.cpu_count()
    summary.update({k: statistics.median(r[k] for r in results) for k in keys})
    # The spread of the figures the targets are set on: [min, max] over the runs.
    spread = ("convert_s", "convert_over_clone", "convert_over_clone_cpu", "rss_growth_over_expert_block")
    spread += ("ratio_256", "ratio_256_vs_eager", "ratio_1", "ratio_1_vs_eager")
    for key in spread:
        if key in keys:
            summary[f"{key}_range"] = [min(r[key] for r in results), max(r[key] for r in results)]
    summary["shares_fused_storage"] = all(r["shares_fused_storage"] for r in results)
    summary["model_bytes"] = results[0]["model_bytes"]
    summary["largest_fused_tensor_bytes"] = results[0]["largest_fused_tensor_bytes"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
