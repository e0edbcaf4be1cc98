"""torch.compile of defused models against fused ones, one JSON line per run.

    python benchmarks/bench_compile.py --model-type qwen3_moe --size medium --runs 3

Each run is a fresh process that builds the model from a config (the sizes of
``bench_convert.py``), compiles the fused model with ``torch.compile`` (inductor, static
shapes), feeds it six same-shape inputs of 256 tokens and counts the graphs and graph breaks
dynamo made (``torch._dynamo.utils.counters``), times its forward at 256 tokens and at 1 token,
then defuses it with ``convert_model`` and does the same.  It prints both counts, the times, the
ratios defused / fused (target <= 1.1) and the largest output difference of the compiled
defused model against its own eager forward and against the compiled fused model.  The last
line holds the medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_convert import SIZES, _config  # the benchmark folder is not a package


def _timed(call, inputs, repeats: int, budget_s: float = 5.0) -> float:
    """Median seconds of one call over up to ``repeats`` calls (after one warm-up)."""
    call(inputs)
    times = []
    start = time.perf_counter()
    while len(times) < repeats and time.perf_counter() - start < budget_s:
        begin = time.perf_counter()
        call(inputs)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _compiled_figures(model, batches, long_inputs, short_inputs) -> dict:
    """Compile ``model`` afresh; graphs and breaks over ``batches``, then forward times."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, dynamic=False)

    def forward(inputs):
        with torch.no_grad():
            return compiled(**inputs, use_cache=False).logits

    start = time.perf_counter()
    outputs = [forward(batch) for batch in batches]
    compile_seconds = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return {
        "graphs": graphs,
        "graph_breaks": breaks,
        "first_six_calls_s": compile_seconds,
        "forward_256_s": _timed(forward, long_inputs, 20),
        "forward_1_s": _timed(forward, short_inputs, 50),
        "output": outputs[0].float(),
    }


def one_run(model_type: str, size: str, dtype_name: str, threads: int | None) -> dict:
    """Build, compile fused, convert, compile defused; compare."""
    import torch
    from transformers import AutoModelForCausalLM

    from defuser import convert_model

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    config = _config(model_type, size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 256), generator=generator)} for _ in range(6)]
    long_inputs, short_inputs = batches[0], {"input_ids": batches[0]["input_ids"][:, :1]}
    fused = _compiled_figures(model, batches, long_inputs, short_inputs)
    assert convert_model(model)
    with torch.no_grad():
        eager = model(**long_inputs, use_cache=False).logits.float()
    defused = _compiled_figures(model, batches, long_inputs, short_inputs)
    return {
        "model_type": model_type,
        "size": size,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "fused_implementation": model.config._experts_implementation,
        "fused_graphs": fused["graphs"],
        "fused_graph_breaks": fused["graph_breaks"],
        "defused_graphs": defused["graphs"],
        "defused_graph_breaks": defused["graph_breaks"],
        "fused_compile_and_six_calls_s": fused["first_six_calls_s"],
        "defused_compile_and_six_calls_s": defused["first_six_calls_s"],
        "fused_forward_256_s": fused["forward_256_s"],
        "defused_forward_256_s": defused["forward_256_s"],
        "ratio_256": defused["forward_256_s"] / fused["forward_256_s"],
        "fused_forward_1_s": fused["forward_1_s"],
        "defused_forward_1_s": defused["forward_1_s"],
        "ratio_1": defused["forward_1_s"] / fused["forward_1_s"],
        "max_abs_diff_vs_eager_defused": (defused["output"] - eager).abs().max().item(),
        "max_abs_diff_vs_compiled_fused": (defused["output"] - fused["output"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="qwen3_moe")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model_type, args.size, args.dtype, args.threads)))
        return
    results = []
    for _ in range(args.runs):
        command = [sys.executable, __file__, "--child", "--model-type", args.model_type, "--size", args.size]
        command += ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(output, flush=True)
        results.append(json.loads(output))
    summary = {"summary": "median", "model_type": args.model_type, "size": args.size, "runs": len(results)}
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "threads":
            figures = [result[key] for result in results]
            summary[key] = statistics.median(figures)
            if key.startswith("ratio"):
                summary[f"{key}_range"] = [min(figures), max(figures)]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
