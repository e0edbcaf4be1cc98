"""auto-round on models defused by defuser: experts recognised as already linear (a
``ModuleList`` of experts with ``gate_proj``/``up_proj``/``down_proj``, no fused names) and
quantized per expert on the CPU (RTN, ``iters=0``).

Skipped when auto-round is not installed; ``nox -s autoround`` installs the version named in
noxfile.py.
"""

from __future__ import annotations

import pytest

auto_round = pytest.importorskip("auto_round", reason="auto-round is not installed (nox -s autoround installs it)")

from defuser import convert_model  # noqa: E402
from tests.downstream.conftest import calibration_texts  # noqa: E402

pytestmark = pytest.mark.slow

# auto-round packs 4-bit weights in groups whose output width must be a multiple of 32.
WIDE_EXPERTS = {"moe_intermediate_size": 32, "intermediate_size": 32}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_autoround_quantizes_every_expert_projection(model_type, tiny_checkpoint):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_checkpoint(model_type, **WIDE_EXPERTS)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert convert_model(model)
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=4,
        group_size=16,
        iters=0,
        nsamples=4,
        seqlen=16,
        device_map="cpu",
        dataset=calibration_texts(8, 32),
    )
    rounder.quantize_and_save(str(folder.parent / f"{model_type}-autoround"), format="auto_round")
    quantized = rounder.model
    experts = [(name, type(module).__name__) for name, module in quantized.named_modules() if ".experts." in name]
    projections = [(name, kind) for name, kind in experts if name.endswith(("gate_proj", "up_proj", "down_proj"))]
    assert projections, "no per-expert projections found"
    left = [name for name, kind in projections if kind == "Linear"]
    assert not left, f"experts left unquantized: {left[:4]}"
