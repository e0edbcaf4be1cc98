"""torchao's ``quantize_`` on the per-expert Linears of a defused model: every expert projection
gets int8 weights and the model still runs, close to the float one.

Skipped when torchao is not installed; ``nox -s torchao`` installs the version named in noxfile.py.
"""

from __future__ import annotations

import pytest
import torch

torchao = pytest.importorskip("torchao", reason="torchao is not installed (nox -s torchao installs it)")

from defuser import convert_model  # noqa: E402
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_torchao_int8_weight_only_on_every_expert(model_type):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = build_tiny_model(model_type)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    assert convert_model(model)
    experts = {name: module for name, module in model.named_modules() if ".experts." in name}
    projections = [name for name, module in experts.items() if isinstance(module, torch.nn.Linear)]
    before = {name: type(experts[name].weight) for name in projections}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in set(projections))
    changed = [name for name in projections if type(experts[name].weight) is not before[name]]
    assert changed == projections, "every expert projection holds a quantized weight"
    output = tiny_forward(model, inputs)
    assert torch.isfinite(output).all()
    assert (output - reference).abs().max().item() <= 0.05 * reference.abs().max().item() + 1e-3
