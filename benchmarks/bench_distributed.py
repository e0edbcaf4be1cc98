"""Per-rank memory of defused experts on a model sharded over 2 CPU ranks, one JSON line per case.

    python benchmarks/bench_distributed.py --model-type qwen3_moe --size small

Builds one checkpoint (2 layers, 64 experts; ``--size`` sets hidden and intermediate sizes),
computes its logits on one process, then starts 2 ranks (torchrun, rendezvous on 127.0.0.1 at
a port the OS picks, gloo kept on the loopback) that load it under each plan (tensor + expert
parallel, FSDP + expert parallel, and transformers 5.24's tensor-parallel experts plan) three
ways: fused, fused then ``convert_model``, built defused by ``replace_fused_blocks``.  Each
rank prints: the experts' bytes it holds (local tensors) over the whole model's, the growth of
its resident memory during ``convert_model`` over its shard (near 0 when the per-expert weights
are views of the shard, about 1 for layouts that copy it: nothing is gathered), conversion
seconds, and the largest logit difference from one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {
    "small": {"hidden_size": 512, "moe_intermediate_size": 256, "intermediate_size": 512},
    "medium": {"hidden_size": 1024, "moe_intermediate_size": 512, "intermediate_size": 1024},
}
PLANS = ("tp_ep", "fsdp_ep", "tp_experts_524")
EXPERTS_TP_524 = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _expert_bytes(model: Any) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.endswith("experts"):
            for tensor in module.parameters():
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def _plan_524(config_class: Any) -> Any:
    stock = config_class.__dict__.get("base_model_tp_plan")
    config_class.base_model_tp_plan = {**(config_class.base_model_tp_plan or {}), **EXPERTS_TP_524}
    try:
        yield
    finally:
        config_class.base_model_tp_plan = stock


def _rank(checkpoint: str, reference_path: str, full: int) -> None:
    """One rank: every plan, every way, one JSON line each."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import defuser

    config = AutoConfig.from_pretrained(checkpoint)
    reference = torch.load(reference_path)
    input_ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    sizes = {
        "tp_ep": {"tp_size": 2, "ep_size": 2},
        "fsdp_ep": {"fsdp_size": 2, "ep_size": 2},
        "tp_experts_524": {"tp_size": 2},
    }
    for plan in PLANS:
        for way in ("fused", "convert_model", "replace_fused_blocks"):
            if way == "replace_fused_blocks":
                defuser.replace_fused_blocks(config.model_type)
            context = _plan_524(type(config)) if plan == "tp_experts_524" else contextlib.nullcontext()
            with context:
                model = AutoModelForCausalLM.from_pretrained(
                    checkpoint, distributed_config=DistributedConfig(**sizes[plan])
                ).eval()
            row: dict[str, Any] = {"rank": dist.get_rank(), "plan": plan, "way": way}
            if way == "convert_model":
                before, start = _rss(), time.perf_counter()
                defuser.convert_model(model)
                row["convert_seconds"] = round(time.perf_counter() - start, 3)
                row["rss_growth_over_shard"] = round((_rss() - before) / max(_expert_bytes(model), 1), 3)
            held = _expert_bytes(model)
            row["expert_bytes_here"], row["of_model"] = held, full
            row["share"] = round(held / full, 3)
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits
            row["max_diff"] = float((logits - reference).abs().max())
            if way == "replace_fused_blocks":
                defuser.restore_fused_blocks(config.model_type)
            for turn in range(2):
                if turn == dist.get_rank():
                    print(json.dumps(row), flush=True)
                dist.barrier()
            del model
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="qwen3_moe", choices=("qwen3_moe", "mixtral"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rank", nargs=3, metavar=("CHECKPOINT", "REFERENCE", "FULL"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.rank:
        _rank(arguments.rank[0], arguments.rank[1], int(arguments.rank[2]))
        return

    import torch

    from defuser.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        checkpoint, reference = Path(folder) / "checkpoint", Path(folder) / "reference.pt"
        model = build_tiny_model(arguments.model_type, num_experts=64, num_local_experts=64, **SIZES[arguments.size])
        model.save_pretrained(checkpoint)
        input_ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.save(model(input_ids=input_ids).logits, reference)
        full = _expert_bytes(model)
        del model
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        interface = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
        if interface is not None:
            env["GLOO_SOCKET_IFNAME"] = interface
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", __file__]
        command += ["--rank", str(checkpoint), str(reference), str(full)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            print(line)
        if result.returncode != 0 or not lines:
            raise SystemExit(f"the 2-rank run failed ({result.returncode}):\n{result.stderr[-4000:]}")


if __name__ == "__main__":
    main()
