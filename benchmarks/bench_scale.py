"""Conversion cost at the scale of published MoE models, on the meta device (no weights).

    python benchmarks/bench_scale.py [--cases deepseek_v3 kimi_k2 preload] [--layers N]

Prints one JSON line per case.  Each case builds the full published architecture on the
``meta`` device (so only module bookkeeping costs time, no weight bytes) and measures, in this
one process and run, three things: the stock fused ``from_config``; a loop that only builds as
many ``nn.Linear`` modules (on meta) as the defused model holds, the practical floor of any
conversion; and the case itself:

* ``deepseek_v3``: ``convert_model`` on DeepSeek-V3 (61 layers, 58 MoE layers of 256 experts);
* ``kimi_k2``: the same on the Kimi-K2 shape (384 routed experts);
* ``preload``: ``replace_fused_blocks("deepseek_v3")`` + ``from_config`` (the defused model
  built directly), against the stock fused ``from_config``.

The floors: ``linear_floor`` builds ``nn.Linear(8, 8, device="meta")`` modules (stock
construction, with its initialisation), ``bare_floor`` only wraps an existing meta tensor in a
Linear (``nn.Module`` bookkeeping plus a Parameter): all a zero-copy conversion must do.

Both floors run with the garbage collector paused, as ``convert_model`` does.  A 2-layer model
is built first, fused and defused, so first-time imports fall on no case.  Ratios are taken
within one process, so they hold better than the absolute seconds on a loaded machine; the
configs are written here since nothing is downloaded.  ``convert_model`` includes its run-time
self-check (a tiny CPU model of the class, once per process; the first case pays it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

# DeepSeek-V3's published config (the values construction reads).
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Kimi-K2: DeepSeek-V3's architecture with 384 routed experts (64 heads, 1 dense layer).
KIMI_K2 = {**DEEPSEEK_V3, "n_routed_experts": 384, "num_attention_heads": 64, "num_key_value_heads": 64}


def _config(values: dict, layers: int | None):
    from transformers import AutoConfig

    values = dict(values)
    if layers is not None:
        values["num_hidden_layers"] = layers
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def _build(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _linears(model) -> int:
    from torch import nn

    return sum(isinstance(module, nn.Linear) for module in model.modules())


def _warm_up() -> None:
    """Build a 2-layer model, fused and defused, so no case pays first-time imports."""
    import defuser

    small = _config(DEEPSEEK_V3, 2)
    _build(small)
    with defuser.defused_blocks(small.model_type):
        _build(small)


def _linear_floor(count: int) -> float:
    """Seconds to build ``count`` ``nn.Linear(8, 8, device="meta")`` modules (their size does
    not matter on meta): what building the defused modules the stock way costs."""
    from torch import nn

    gc.disable()  # as in convert_model (defuser.engine.layout.collector_paused)
    start = time.perf_counter()
    kept = [nn.Linear(8, 8, bias=False, device="meta") for _ in range(count)]
    seconds = time.perf_counter() - start
    gc.enable()
    del kept
    return seconds


def _bare_floor(count: int) -> float:
    """Seconds to build ``count`` Linears that only wrap an existing meta tensor (``nn.Module``
    bookkeeping plus one ``nn.Parameter``, no initialisation): all a zero-copy conversion must
    do per Linear."""
    import torch
    from torch import nn

    weight = torch.empty(8, 8, device="meta")
    gc.disable()
    start = time.perf_counter()
    kept = []
    for _ in range(count):
        layer = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(layer)
        layer.in_features = layer.out_features = 8
        layer.weight = nn.Parameter(weight)
        layer.bias = None
        kept.append(layer)
    seconds = time.perf_counter() - start
    gc.enable()
    del kept
    return seconds


def _case_convert(name: str, values: dict, layers: int | None) -> dict:
    import defuser

    config = _config(values, layers)
    stock, model = _timed(lambda: _build(config))
    before = _linears(model)
    convert, changed = _timed(lambda: defuser.convert_model(model))
    after = _linears(model)
    floor, bare = _linear_floor(after - before), _bare_floor(after - before)
    return {
        "case": name,
        "layers": config.num_hidden_layers,
        "experts": config.n_routed_experts,
        "changed": changed,
        "linears_after": after,
        "new_linears": after - before,
        "convert_s": round(convert, 3),
        "stock_from_config_s": round(stock, 3),
        "linear_floor_s": round(floor, 3),
        "bare_floor_s": round(bare, 3),
        "convert_over_stock": round(convert / stock, 2),
        "convert_over_linear_floor": round(convert / floor, 2),
        "convert_over_bare_floor": round(convert / bare, 2),
    }


def _case_preload(values: dict, layers: int | None) -> dict:
    import defuser

    config = _config(values, layers)
    stock, model = _timed(lambda: _build(config))
    fused_linears = _linears(model)
    del model
    with defuser.defused_blocks(config.model_type):
        defused, model = _timed(lambda: _build(config))
    after = _linears(model)
    floor, bare = _linear_floor(after - fused_linears), _bare_floor(after - fused_linears)
    return {
        "case": "preload",
        "layers": config.num_hidden_layers,
        "experts": config.n_routed_experts,
        "linears_after": after,
        "defused_from_config_s": round(defused, 3),
        "stock_from_config_s": round(stock, 3),
        "linear_floor_s": round(floor, 3),
        "bare_floor_s": round(bare, 3),
        "defused_over_stock": round(defused / stock, 2),
        "extra_over_linear_floor": round((defused - stock) / floor, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["deepseek_v3", "kimi_k2", "preload"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than published (quick runs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _warm_up()
    for case in args.cases:
        if case == "deepseek_v3":
            result = _case_convert(case, DEEPSEEK_V3, args.layers)
        elif case == "kimi_k2":
            result = _case_convert(case, KIMI_K2, args.layers)
        elif case == "preload":
            result = _case_preload(DEEPSEEK_V3, args.layers)
        else:
            parser.error(f"unknown case {case!r}")
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
