"""One rank of the 2-rank distributed checks of tests/test_distributed.py (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 ... tests/distributed_worker.py SPEC.json OUT_DIR

SPEC lists cases; each loads a tiny checkpoint with a distributed plan (as fused, after
``replace_fused_blocks``, or fused then ``convert_model``), runs it on fixed token ids and
compares the logits with the single-process reference the test computed; then, as the case
asks, saves it (every rank calls ``save_pretrained``, as transformers wants) and fuses it back
with ``fuse_model`` and compares again.  Every rank writes ``OUT_DIR/rank<R>.json``: per case
the outcome (``ok``, ``refused`` by ``DistributedPlanError`` before any change, or the error's
type and message) and what each rank holds of the experts (tensors, local bytes, experts per
module).  A case that fails is recorded and the next one runs; all ranks take the same path
through a case, so a failure on one is a failure on all.  Each rank also stops itself (with a
traceback) before the test's time bound.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# transformers 5.24's default tensor-parallel entries for experts (5.25 dropped them): the fused
# tensors sharded over the ranks (gate-up by columns, down by rows) and the experts' output summed.
EXPERTS_TP_524 = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}


@contextlib.contextmanager
def _plan_524(checkpoint: str) -> Iterator[None]:
    """The model type's config class carries transformers 5.24's experts entries in its
    ``base_model_tp_plan`` for the block (what ``tp_plan="auto"`` applied there)."""
    from transformers import AutoConfig

    cls = type(AutoConfig.from_pretrained(checkpoint))
    stock = cls.__dict__.get("base_model_tp_plan")
    cls.base_model_tp_plan = {**(cls.base_model_tp_plan or {}), **EXPERTS_TP_524}
    try:
        yield
    finally:
        if stock is None:
            del cls.base_model_tp_plan
        else:
            cls.base_model_tp_plan = stock


def _distributed_kwargs(plan: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a plan name of the spec."""
    if plan == "tp_auto":
        return {"tp_plan": "auto"}
    from transformers.distributed import DistributedConfig

    configs = {
        "tp": lambda: DistributedConfig(tp_size=2),
        "tp_experts_524": lambda: DistributedConfig(tp_size=2),
        # Only the experts' module style, on whatever the model holds at that path.
        "tp_experts_style": lambda: DistributedConfig(
            tp_size=2, tp_plan={"model.layers.*.mlp.experts": "moe_tp_experts"}
        ),
        "tp_ep": lambda: DistributedConfig(tp_size=2, ep_size=2),
        "fsdp_ep": lambda: DistributedConfig(fsdp_size=2, ep_size=2),
        "fsdp": lambda: DistributedConfig(fsdp_size=2),
    }
    return {"distributed_config": configs[plan]()}


def _expert_tensors(model: torch.nn.Module) -> dict[str, Any]:
    """What this rank holds of the experts: tensor count, local bytes (each storage once), the
    number of experts per experts module, the experts modules' classes and tensor placements."""
    from defuser.engine.experts import DefusedExperts

    storages: dict[int, int] = {}
    tensor_bytes = 0
    count = 0
    held: list[int] = []
    classes: set[str] = set()
    placements: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name.endswith("experts"):
            continue
        classes.add(type(module).__name__)
        if isinstance(module, DefusedExperts):
            held.append(len(module))
        else:
            held.append(int(getattr(module, "num_experts", -1) or -1))
        for tensor_name, tensor in module.named_parameters():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if name.endswith("layers.0.mlp.experts") and tensor_name.count(".") <= 2:
                placements[tensor_name] = str(tuple(getattr(tensor, "placements", ())))
            if local.device.type == "meta":
                continue
            storage = local.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            tensor_bytes += local.numel() * local.element_size()
            count += 1
    return {
        "tensors": count,
        # The storages holding them (a loader may keep a shard inside a bigger tensor it read) ...
        "bytes": sum(storages.values()),
        # ... and the tensors themselves.
        "tensor_bytes": tensor_bytes,
        "held": held,
        "classes": sorted(classes),
        "placements": placements,
    }


def _logits_difference(model: torch.nn.Module, inputs: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return (logits.float() - reference.float()).abs().max().item()


class _Messages(logging.Handler):
    """Keeps transformers' log records of a case (its loading report names conversion errors)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run_case(case: dict[str, Any], inputs: torch.Tensor, messages: _Messages) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    import defuser

    action = case["action"]
    reference = torch.load(case["reference"])
    plan = _plan_524(case["checkpoint"]) if case["plan"] == "tp_experts_524" else contextlib.nullcontext()
    if action == "replace":
        defuser.replace_fused_blocks(case["model_type"])
    try:
        with plan:
            model = AutoModelForCausalLM.from_pretrained(case["checkpoint"], **_distributed_kwargs(case["plan"]))
        model.eval()
        result: dict[str, Any] = {"before": _expert_tensors(model), "outcome": "ok"}
        if action == "convert":
            try:
                result["converted"] = defuser.convert_model(model)
            except defuser.DistributedPlanError as error:
                # Refused before any change: the model must still be the fused one, and still right.
                result.update(outcome="refused", type=type(error).__name__, message=str(error))
        result["max_diff"] = _logits_difference(model, inputs, reference)
        result["after"] = _expert_tensors(model)
        if case.get("save"):
            model.save_pretrained(case["save"])
        if case.get("fuse"):
            result["fused"] = defuser.fuse_model(model)
            result["fused_max_diff"] = _logits_difference(model, inputs, reference)
            result["after_fuse"] = _expert_tensors(model)
        return result
    finally:
        if action == "replace":
            defuser.restore_fused_blocks()


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    # torchrun gives each rank its own session: the test kills these pids if the launch overruns,
    # and a rank stuck in a collective (the other rank failed differently) dumps where and exits.
    (out / f"pid{rank}").write_text(str(os.getpid()))
    faulthandler.dump_traceback_later(float(spec["seconds"]), exit=True)
    torch.manual_seed(0)
    inputs = torch.tensor(spec["input_ids"])
    results: dict[str, Any] = {}
    for case in spec["cases"]:
        start = time.perf_counter()
        messages = _Messages()
        logging.getLogger("transformers").addHandler(messages)
        try:
            results[case["id"]] = _run_case(case, inputs, messages)
        except Exception as error:  # recorded for the test to judge; the next case runs
            results[case["id"]] = {
                "outcome": "error",
                "type": type(error).__name__,
                "message": str(error),
                "log": "\n".join(messages.lines)[-6000:],
                "traceback": traceback.format_exc()[-4000:],
            }
        finally:
            logging.getLogger("transformers").removeHandler(messages)
        results[case["id"]]["seconds"] = round(time.perf_counter() - start, 3)
        gc.collect()
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
