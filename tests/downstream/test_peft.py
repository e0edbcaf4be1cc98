"""LoRA on the experts of a defused model with PEFT.

PEFT (0.21) rewrites ``target_modules=["gate_proj", "up_proj", "down_proj"]`` to the fused expert
parameters for the model types whose transformers mapping fuses per-expert keys like Qwen2-MoE's
(qwen3_moe, deepseek_v3, olmoe, glm4_moe, ...), and finds nothing on a defused model.  The
README's recipe injects the adapters into the decoder layers, which carry no config and are
left as named; ``get_peft_model`` on the whole model works for the other types (mixtral, gpt_oss).

Skipped when PEFT is not installed; ``nox -s peft`` installs the version named in noxfile.py.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (nox -s peft installs it)")

from defuser import convert_model  # noqa: E402
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs  # noqa: E402

pytestmark = pytest.mark.slow

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _expert_projections(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if ".experts." in name and name.endswith(tuple(TARGETS))]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "olmoe", "glm4_moe", "mixtral", "gpt_oss"])
def test_lora_on_every_expert_projection_trains(model_type):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = build_tiny_model(model_type)
    assert convert_model(model)
    inputs = tiny_inputs(model)
    reference = tiny_forward(model, inputs)
    expected = _expert_projections(model)
    layers = model.model.layers
    inject_adapter_in_model(LoraConfig(target_modules=TARGETS, r=4, init_lora_weights=True), layers)
    adapted = [name for name, module in model.named_modules() if name.endswith(".lora_A.default")]
    assert {name.removesuffix(".lora_A.default") for name in adapted} >= set(expected)
    assert torch.equal(tiny_forward(model, inputs), reference), "LoRA starts as a no-op (B = 0)"
    trainable = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    assert trainable and all(parameter.requires_grad for parameter in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(tiny_forward(model, inputs), reference), "a step on the adapters changes the output"
    state = get_peft_model_state_dict(layers)
    assert "0.mlp.experts.0.gate_proj.lora_A.weight" in state


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_get_peft_model_works_where_peft_does_not_rewrite_the_names(model_type):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(model_type)
    assert convert_model(model)
    wrapped = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=4))
    adapted = {
        name.removesuffix(".lora_A.default").removeprefix("base_model.model.")
        for name, _ in wrapped.named_modules()
        if name.endswith(".lora_A.default")
    }
    assert adapted >= set(_expert_projections(wrapped.base_model.model))
