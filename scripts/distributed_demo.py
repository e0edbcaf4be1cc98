"""Defused experts on a model sharded over ranks, next to one process (run it under torchrun).

    python -c "from defuser.tiny import build_tiny_model as b; b('qwen3_moe').save_pretrained('tiny-qwen3-moe')"
    GLOO_SOCKET_IFNAME=lo torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 \\
        scripts/distributed_demo.py tiny-qwen3-moe --plan tp_ep

Loads the checkpoint three ways under the plan: stock (fused), fused then ``convert_model``, and
built defused by ``replace_fused_blocks``; prints, per rank, the experts' bytes this rank holds
and the largest difference of the logits from the checkpoint run on one process (each rank
computes that reference itself).  Plans: ``tp`` (``DistributedConfig(tp_size=N)``), ``tp_ep``
(``tp_size=N, ep_size=N``), ``fsdp_ep`` (``fsdp_size=N, ep_size=N``), with N the number of
ranks; ``tp_auto`` (``tp_plan="auto"``, the only one transformers 5.3 has).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist


def _plan_arguments(plan: str, ranks: int) -> dict[str, Any]:
    if plan == "tp_auto":
        return {"tp_plan": "auto"}
    from transformers.distributed import DistributedConfig

    sizes = {"tp": {"tp_size": ranks}, "tp_ep": {"tp_size": ranks, "ep_size": ranks}}
    sizes["fsdp_ep"] = {"fsdp_size": ranks, "ep_size": ranks}
    return {"distributed_config": DistributedConfig(**sizes[plan])}


def _expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the experts' tensors on this rank (a DTensor counts its local shard)."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("experts"):
            for tensor in module.parameters():
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                total += local.numel() * local.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--plan", choices=("tp", "tp_ep", "fsdp_ep", "tp_auto"), default="tp_ep")
    arguments = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    import defuser

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    model_type = AutoConfig.from_pretrained(arguments.checkpoint).model_type
    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    single = AutoModelForCausalLM.from_pretrained(arguments.checkpoint).eval()
    reference, full = logits(single), _expert_bytes(single)
    del single
    rows = []
    for way in ("fused", "convert_model", "replace_fused_blocks"):
        if way == "replace_fused_blocks":
            defuser.replace_fused_blocks(model_type)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                arguments.checkpoint, **_plan_arguments(arguments.plan, ranks)
            ).eval()
            if way == "convert_model":
                defuser.convert_model(model)
            difference = (logits(model) - reference).abs().max().item()
            rows.append(
                f"{way:<21} experts here {_expert_bytes(model):>9,} of {full:,} bytes, max diff {difference:.3e}"
            )
        finally:
            if way == "replace_fused_blocks":
                defuser.restore_fused_blocks(model_type)
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = "\n".join(f"rank {rank}/{ranks} {model_type} {arguments.plan}: {row}" for row in rows)
    for turn in range(ranks):  # one rank after the other, so the lines do not mix
        if turn == rank:
            print(report, flush=True)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
