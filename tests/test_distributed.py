"""Distributed models: 2 CPU ranks (gloo, loopback only) against the single-process outputs.

Tiny checkpoints of qwen3_moe, mixtral, gpt_oss (MoE) and phi3 (a dense fused gate-up MLP)
are loaded with transformers' distributed support: tensor parallel (``tp_size=2``; and, for
the experts, transformers 5.24's plan that shards the fused tensors), tensor + expert
parallel (``tp_size=2, ep_size=2``) and FSDP + expert parallel (``fsdp_size=2, ep_size=2``).
Each case loads the model fused and calls ``convert_model``, or builds it defused with
``replace_fused_blocks``, and compares its logits on every rank with the single-process fused
model's.  Every case of a transformers release runs in ONE torchrun launch
(tests/distributed_worker.py), bounded in time; the rendezvous binds 127.0.0.1 on a port the
OS picks, and gloo is kept on the loopback interface.

transformers 5.3.0 has no ``DistributedConfig(tp_size=..., ep_size=...)`` (its expert parallel
fails in its own loader), so there only ``tp_plan="auto"`` runs; the other cases are skipped
with that reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from defuser.tiny import build_tiny_model

WORKER = Path(__file__).with_name("distributed_worker.py")
ATOL = 1e-5
# One launch: start-up (about 10 s on a loaded 2-core machine) and a second or less per case.
LAUNCH_TIMEOUT_S = 420

MOE = ("qwen3_moe", "mixtral", "gpt_oss")
DENSE = ("phi3",)


def _has_distributed_config() -> bool:
    """transformers 5.24+: ``DistributedConfig`` takes ``tp_size``/``ep_size``/``fsdp_size``."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    fields = {field.name for field in dataclasses.fields(DistributedConfig)}
    return {"tp_size", "ep_size", "fsdp_size"} <= fields


MODERN = _has_distributed_config()
LEGACY_REASON = (
    "transformers {version} has no DistributedConfig(tp_size=..., ep_size=..., fsdp_size=...) "
    "(5.24 added them; 5.3's expert parallel fails in its own loader): only tp_plan='auto' runs here"
)


@dataclasses.dataclass(frozen=True)
class Case:
    model_type: str
    plan: str
    action: str  # "convert": load fused, then convert_model; "replace": replace_fused_blocks, then load
    expect: str = "ok"  # or the name of the error it must raise

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.plan}-{self.action}"


def _cases() -> list[Case]:
    if not MODERN:
        return [
            Case(model_type, "tp_auto", action, expect)
            for model_type in ("qwen3_moe", "mixtral", *DENSE)
            for action, expect in (("replace", "ok"), ("convert", "DistributedPlanError"))
        ]
    cases = []
    for model_type in MOE:
        cases += [Case(model_type, "tp", "convert"), Case(model_type, "tp", "replace")]
        for plan in ("tp_ep", "fsdp_ep"):
            cases += [Case(model_type, plan, "convert", "DistributedPlanError"), Case(model_type, plan, "replace")]
        if model_type != "gpt_oss":  # interleaved gate-up: no plan shards it by columns
            cases += [
                Case(model_type, "tp_experts", "convert", "DistributedPlanError"),
                Case(model_type, "tp_experts_style", "replace"),
            ]
    for model_type in DENSE:
        cases += [Case(model_type, "tp", "convert", "DistributedPlanError"), Case(model_type, "tp", "replace")]
    return cases


CASES = _cases()


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo``, ``lo0``), for gloo to stay on it."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Tiny checkpoints, their single-process logits, and every rank's results of one launch."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("distributed")
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    spec_cases = []
    for model_type in dict.fromkeys(case.model_type for case in CASES):
        checkpoint = root / model_type
        build_tiny_model(model_type).save_pretrained(checkpoint)
        # The reference: the checkpoint as stock transformers loads it on one process.
        reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            torch.save(reference(input_ids=input_ids).logits, root / f"{model_type}.pt")
        for case in (case for case in CASES if case.model_type == model_type):
            spec_cases.append(
                {
                    "id": case.id,
                    "model_type": model_type,
                    "checkpoint": str(checkpoint),
                    "reference": str(root / f"{model_type}.pt"),
                    "plan": case.plan,
                    "action": case.action,
                }
            )
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cases": spec_cases, "input_ids": input_ids.tolist()}))
    out = root / "results"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    interface = _loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        # The rendezvous store binds the loopback address on a port the OS picks: no race for a port.
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        str(WORKER),
        str(spec),
        str(out),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        done = {path.name: sorted(json.loads(path.read_text())) for path in out.glob("rank*.json")}
        pytest.fail(f"the 2-rank launch ran past {LAUNCH_TIMEOUT_S} s; cases finished: {done}\n{log[-6000:]}")
    results = {}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results (exit status {process.returncode}):\n{log[-6000:]}")
        results[rank] = json.loads(path.read_text())
    return results


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_two_ranks_match_one_process(case: Case, distributed_results: dict[int, dict[str, Any]]) -> None:
    """Every rank's logits equal the single-process model's, or the case raises the clear error it must."""
    for rank, results in distributed_results.items():
        result = results.get(case.id)
        assert result is not None, f"rank {rank} did not run {case.id}"
        if case.expect == "ok":
            assert result["outcome"] == "ok", (
                f"rank {rank}: {result.get('type')}: {result.get('message')}\n{result.get('traceback')}"
            )
            assert result["max_diff"] <= ATOL, f"rank {rank}: logits differ by {result['max_diff']}"
            if case.action == "convert":
                assert result["converted"] is True
        else:
            assert result["outcome"] == "refused", f"rank {rank}: {case.id} should raise {case.expect}: {result}"
            assert result["type"] == case.expect, f"rank {rank}: {result['type']}: {result['message']}"
            # The refusal names the module and the plan, and nothing changed: same tensors, same outputs.
            assert "mlp" in result["message"] and ("plan" in result["message"] or "style" in result["message"])
            assert result["after"] == result["before"]
            assert result["max_diff"] <= ATOL, f"rank {rank}: logits differ by {result['max_diff']} after a refusal"


def test_legacy_release_skips_with_reason() -> None:
    """On a release without DistributedConfig's sizes the tensor/expert/FSDP matrix is skipped, never silently."""
    if MODERN:
        pytest.skip("this transformers has DistributedConfig(tp_size, ep_size, fsdp_size): the full matrix runs")
    import transformers

    pytest.skip(LEGACY_REASON.format(version=transformers.__version__))
