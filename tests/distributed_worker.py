"""One rank of the 2-rank distributed checks of tests/test_distributed.py (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 ... tests/distributed_worker.py SPEC.json OUT_DIR

SPEC lists cases; each loads a tiny checkpoint with a distributed plan (as fused, after
``replace_fused_blocks``, or fused then ``convert_model``), runs it on fixed token ids and
compares the logits with the single-process reference the test computed.  Every rank writes
``OUT_DIR/rank<R>.json``: per case the outcome (``ok`` with the largest difference, or the
error's type and message) and what each rank holds (expert tensors, their bytes).  A case that
fails is recorded and the next one runs; all ranks take the same path through a case, so a
failure on one is a failure on all and nothing waits forever.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _distributed_kwargs(plan: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a plan name of the spec."""
    if plan == "tp_auto":
        return {"tp_plan": "auto"}
    from transformers.distributed import DistributedConfig

    experts_tp = {
        "model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "model.layers.*.mlp.experts.down_proj": "rowwise",
        "model.layers.*.mlp.experts": "moe_tp_experts",
    }
    configs = {
        "tp": lambda: DistributedConfig(tp_size=2),
        # transformers 5.24's default tensor-parallel plan for experts, which 5.25 dropped: the
        # fused tensors sharded over the ranks and the experts' output summed.
        "tp_experts": lambda: DistributedConfig(tp_size=2, tp_plan=experts_tp),
        # Only the experts' module style, on whatever the model holds at that path.
        "tp_experts_style": lambda: DistributedConfig(
            tp_size=2, tp_plan={"model.layers.*.mlp.experts": "moe_tp_experts"}
        ),
        "tp_ep": lambda: DistributedConfig(tp_size=2, ep_size=2),
        "fsdp_ep": lambda: DistributedConfig(fsdp_size=2, ep_size=2),
    }
    return {"distributed_config": configs[plan]()}


def _expert_tensors(model: torch.nn.Module) -> dict[str, Any]:
    """What this rank holds of the experts: tensor count, local bytes (each storage once) and
    the number of experts per experts module."""
    from defuser.engine.experts import DefusedExperts

    storages: dict[int, int] = {}
    count = 0
    held: list[int] = []
    for name, module in model.named_modules():
        if not name.endswith("experts"):
            continue
        if isinstance(module, DefusedExperts):
            held.append(len(module))
        else:
            held.append(int(getattr(module, "num_experts", -1) or -1))
        for tensor in module.parameters():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.device.type == "meta":
                continue
            storage = local.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            count += 1
    return {"tensors": count, "bytes": sum(storages.values()), "held": held}


def _run_case(case: dict[str, Any], inputs: torch.Tensor) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import defuser

    action = case["action"]
    if action.startswith("replace"):
        defuser.replace_fused_blocks(case["model_type"])
    try:
        model = AutoModelForCausalLM.from_pretrained(case["checkpoint"], **_distributed_kwargs(case["plan"]))
        model.eval()
        result: dict[str, Any] = {"before": _expert_tensors(model), "outcome": "ok"}
        if action == "convert":
            try:
                result["converted"] = defuser.convert_model(model)
            except defuser.DistributedPlanError as error:
                # Refused before any change: the model must still be the fused one, and still right.
                result.update(outcome="refused", type=type(error).__name__, message=str(error))
        with torch.no_grad():
            logits = model(input_ids=inputs).logits
        reference = torch.load(case["reference"])
        result["max_diff"] = (logits.float() - reference.float()).abs().max().item()
        result["after"] = _expert_tensors(model)
        return result
    finally:
        if action.startswith("replace"):
            defuser.restore_fused_blocks()


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.manual_seed(0)
    inputs = torch.tensor(spec["input_ids"])
    results: dict[str, Any] = {}
    rank = int(os.environ.get("RANK", "0"))
    for case in spec["cases"]:
        start = time.perf_counter()
        try:
            results[case["id"]] = _run_case(case, inputs)
        except Exception as error:  # recorded for the test to judge; the next case runs
            results[case["id"]] = {
                "outcome": "error",
                "type": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exc()[-4000:],
            }
        results[case["id"]]["seconds"] = round(time.perf_counter() - start, 3)
        gc.collect()
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
