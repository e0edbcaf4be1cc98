"""Distributed models: 2 CPU ranks (gloo, loopback only) against the single-process outputs.

Tiny checkpoints of qwen3_moe, mixtral, gpt_oss (MoE), phi3 and glm4 (dense fused gate-up MLPs)
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

import contextlib
import dataclasses
import json
import os
import re
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
DENSE = ("phi3", "glm4")


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
    expect: str = "ok"  # "ok", "refused" (DistributedPlanError before any change) or an error type
    # How many ranks share the experts: their tensors on a rank are that part of the full model's.
    expert_shards: int = 1
    checkpoint: str = ""  # "" for the type's own checkpoint, "fused" for one saved with fused experts
    fuse: bool = False  # fuse_model afterwards: the same outputs, sharded as transformers shards it
    save: bool = False  # save_pretrained from every rank: a full checkpoint for one process

    @property
    def id(self) -> str:
        return "-".join(part for part in (self.model_type, self.checkpoint, self.plan, self.action) if part)


def _default_tp_expert_shards(model_type: str) -> int:
    """2 when the release's own tensor-parallel plan for ``model_type`` shards the experts (5.24), else 1."""
    from transformers import AutoConfig

    plan = type(AutoConfig.for_model(model_type)).base_model_tp_plan or {}
    return 2 if plan.get("layers.*.mlp.experts") == "moe_tp_experts" else 1


def _cases() -> list[Case]:
    if not MODERN:
        return [
            case
            for model_type in ("qwen3_moe", "mixtral", *DENSE)
            for case in (
                Case(model_type, "tp_auto", "replace", save=True),
                Case(model_type, "tp_auto", "convert", "refused"),
            )
        ]
    cases = []
    for model_type in MOE:
        # transformers 5.25's tensor-parallel plan leaves the experts replicated; 5.24's shards them.
        shards = _default_tp_expert_shards(model_type)
        cases += [Case(model_type, "tp", action, expert_shards=shards) for action in ("convert", "replace")]
        for plan in ("tp_ep", "fsdp_ep"):
            cases += [
                Case(model_type, plan, action, expert_shards=2, fuse=True, save=True)
                for action in ("convert", "replace")
            ]
        if model_type == "gpt_oss":  # interleaved gate-up rows: no plan shards them by columns
            continue
        cases += [
            Case(model_type, "tp_experts_524", action, expert_shards=2, fuse=True, save=True)
            for action in ("convert", "replace")
        ]
        # The experts' style alone on defused experts (not sharded unless the release's plan shards them).
        cases.append(Case(model_type, "tp_experts_style", "replace", expert_shards=shards))
    # FSDP alone shards every layer: converting is refused, building defused lets FSDP shard the Linears.
    cases += [Case("qwen3_moe", "fsdp", "convert", "refused"), Case("qwen3_moe", "fsdp", "replace", expert_shards=2)]
    # A fused checkpoint cannot reach per-expert weights sharded by columns through transformers' loader.
    cases.append(Case("qwen3_moe", "tp_experts_524", "replace", "RuntimeError", checkpoint="fused"))
    for model_type in DENSE:
        cases += [Case(model_type, "tp", "convert", fuse=True, save=True), Case(model_type, "tp", "replace", save=True)]
    return cases


CASES = _cases()


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo``, ``lo0``), for gloo to stay on it."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def _kill_launch(process: subprocess.Popen, out: Path) -> None:
    """End the launcher's process group and every rank it started that still runs (each rank has
    its own session; a pid counts only while its command line names this launch's folder)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for path in out.glob("pid*"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(path.read_text())
            if str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Tiny checkpoints, their single-process logits, and every rank's results of one launch."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("distributed")
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    spec_cases = []
    for model_type in dict.fromkeys(case.model_type for case in CASES):
        checkpoint = root / model_type
        model = build_tiny_model(model_type)
        model.save_pretrained(checkpoint)
        # The same weights with the experts as transformers holds them in memory (fused keys).
        model.save_pretrained(root / f"{model_type}-fused", save_original_format=False)
        # The reference: the checkpoint as stock transformers loads it on one process.
        reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            torch.save(reference(input_ids=input_ids).logits, root / f"{model_type}.pt")
        for case in (case for case in CASES if case.model_type == model_type):
            spec_cases.append(
                {
                    "id": case.id,
                    "model_type": model_type,
                    "checkpoint": str(root / "-".join(filter(None, (model_type, case.checkpoint)))),
                    "reference": str(root / f"{model_type}.pt"),
                    "plan": case.plan,
                    "action": case.action,
                    "fuse": case.fuse,
                    "save": str(root / "saved" / case.id) if case.save else "",
                }
            )
    spec = root / "spec.json"
    # Each rank stops itself a little before the launch's bound, with a traceback of where it was.
    budget = LAUNCH_TIMEOUT_S - 30
    spec.write_text(json.dumps({"cases": spec_cases, "input_ids": input_ids.tolist(), "seconds": budget}))
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
        _kill_launch(process, out)
        log, _ = process.communicate()
        done = {path.name: sorted(json.loads(path.read_text())) for path in out.glob("rank*.json")}
        pytest.fail(f"the 2-rank launch ran past {LAUNCH_TIMEOUT_S} s; cases finished: {done}\n{log[-6000:]}")
    finally:
        if process.poll() is None:
            _kill_launch(process, out)
    results: dict[Any, Any] = {"root": root}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results (exit status {process.returncode}):\n{log[-6000:]}")
        results[rank] = json.loads(path.read_text())
    return results


def _full_expert_bytes(model_type: str) -> int:
    """Bytes of the experts' tensors of the whole single-process model."""
    model = build_tiny_model(model_type)
    return sum(
        tensor.numel() * tensor.element_size()
        for name, module in model.named_modules()
        if name.endswith("experts")
        for tensor in module.parameters()
    )


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_two_ranks_match_one_process(case: Case, distributed_results: dict[Any, Any]) -> None:
    """Every rank's logits equal the single-process model's, each rank holds its share of the
    experts and no more, or the case fails with the clear error it must."""
    full = _full_expert_bytes(case.model_type) if case.model_type in MOE else 0
    for rank in range(2):
        result = distributed_results[rank].get(case.id)
        assert result is not None, f"rank {rank} did not run {case.id}"
        details = f"rank {rank}: {result.get('type')}: {result.get('message')}\n{result.get('traceback')}"
        if case.expect not in ("ok", "refused"):
            assert result["outcome"] == "error" and result["type"] == case.expect, details
            # transformers raises after its loading report, whose conversion entry carries defuser's reason.
            assert "checkpoint holds" in result["log"] and "per-expert checkpoint" in result["log"], result["log"]
            continue
        assert result["outcome"] == case.expect, details
        assert result["max_diff"] <= ATOL, f"rank {rank}: logits differ by {result['max_diff']}"
        if case.expect == "refused":
            # The refusal names the module and the plan, and nothing changed: same tensors, same outputs.
            assert "mlp" in result["message"] and ("plan" in result["message"] or "style" in result["message"])
            assert result["after"] == result["before"]
            continue
        if case.action == "convert":
            assert result["converted"] is True
        after = result["after"]
        if case.model_type in MOE:
            assert all("Defused" in name for name in after["classes"]), after["classes"]
            # Per-rank expert memory is this rank's share: the shard, views of it where the layout allows.
            assert after["tensor_bytes"] == full // case.expert_shards, f"rank {rank}: {after} of {full} bytes"
            if case.action == "convert":  # and no storage beyond it (transformers' loader may keep more)
                assert after["bytes"] == full // case.expert_shards, f"rank {rank}: {after} of {full} bytes"
            if case.plan in ("tp_ep", "fsdp_ep"):
                assert set(after["held"]) == {8 // case.expert_shards}, after["held"]
            if case.action == "convert":
                assert after["bytes"] <= result["before"]["bytes"]
        if case.fuse:
            assert result["fused"] is True
            assert result["fused_max_diff"] <= ATOL, (
                f"rank {rank}: fused back, logits differ by {result['fused_max_diff']}"
            )
            if case.model_type in MOE:
                fused = result["after_fuse"]
                assert not any("Defused" in name for name in fused["classes"]), fused["classes"]
                assert fused["tensor_bytes"] == full // case.expert_shards
                # Sharded exactly as transformers shards the fused model.
                stock = distributed_results[rank][dataclasses.replace(case, action="convert").id]["before"]
                assert fused["placements"] == stock["placements"]


SAVED = [pytest.param(case, id=case.id) for case in CASES if case.save]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", SAVED)
def test_saved_checkpoint_reloads_on_one_process(case: Case, distributed_results: dict[Any, Any]) -> None:
    """``save_pretrained`` on every rank gathers a full checkpoint that one process loads, as the
    README's reload column says for the type, with the single-process outputs."""
    from transformers import AutoModelForCausalLM

    from defuser import defused_blocks
    from defuser.plugin_info import RELOAD_PATCHED
    from defuser.plugins import list_plugins

    assert distributed_results[0][case.id]["outcome"] == "ok"
    saved = distributed_results["root"] / "saved" / case.id
    support = next(
        found
        for plugin in list_plugins()
        if plugin.info is not None and (found := plugin.info.support_for(case.model_type)) is not None
    )
    patched = defused_blocks(case.model_type) if support.reload == RELOAD_PATCHED else contextlib.nullcontext()
    with patched:
        model = AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))).logits
    reference = torch.load(distributed_results["root"] / f"{case.model_type}.pt")
    assert (logits - reference).abs().max().item() <= ATOL


def test_legacy_release_skips_with_reason() -> None:
    """On a release without DistributedConfig's sizes the tensor/expert/FSDP matrix is skipped, never silently."""
    if MODERN:
        pytest.skip("this transformers has DistributedConfig(tp_size, ep_size, fsdp_size): the full matrix runs")
    import transformers

    pytest.skip(LEGACY_REASON.format(version=transformers.__version__))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_readme_distributed_commands_print_what_the_readme_shows(tmp_path: Path) -> None:
    """The README's "Distributed" commands run as written (this environment's binaries, a port
    the OS picked instead of 29500) and print its text, logit differences masked and checked."""
    if not MODERN:
        import transformers

        pytest.skip(LEGACY_REASON.format(version=transformers.__version__))
    readme = (WORKER.parents[1] / "README.md").read_text()
    section = readme.split("## Distributed\n", 1)[1].split("\n## ", 1)[0]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", "").splitlines()
    shown = section.split("```text\n", 1)[1].split("```", 1)[0].strip("\n")
    binaries = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    output = ""
    demo = str(WORKER.parents[1] / "scripts" / "distributed_demo.py")
    for template in commands[1:]:  # the first creates .venv, which this environment stands for
        template = template.replace(".venv/bin/", f"{binaries}/").replace("scripts/distributed_demo.py", demo)
        for _attempt in range(3):  # a port found free may be taken before torchrun binds it: try another
            command = template.replace("--master_port 29500", f"--master_port {_free_port()}")
            result = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
            )
            if "address already in use" not in (result.stdout + result.stderr).lower():
                break
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout
    printed = "\n".join(line for line in output.splitlines() if line.startswith("rank "))
    figures = [float(figure) for figure in re.findall(r"\d\.\d{3}e[+-]\d{2}", printed)]
    assert len(figures) == 6 and all(figure <= ATOL for figure in figures), printed
    mask = re.compile(r"\d\.\d{3}e[+-]\d{2}")
    assert mask.sub("<figure>", printed) == mask.sub("<figure>", shown)
