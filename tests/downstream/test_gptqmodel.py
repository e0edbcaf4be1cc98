"""GPTQModel, unchanged, with defuser installed in place of ModelCloud's Defuser: it loads tiny
qwen3_moe, mixtral and gpt_oss models through ``replace_fused_blocks`` / ``convert_model``, calls
``defuser.modeling.replace_modules.materialize_model`` per layer and GPTQ-quantizes every expert
projection on the CPU.

Skipped when GPTQModel is not installed; ``nox -s gptqmodel`` installs the version named in
noxfile.py next to this checkout.
"""

from __future__ import annotations

import os

import pytest
import torch

# GPTQModel sizes its CPU worker pools from the core count and refuses fewer than 2 workers
# for its loader pool (a 2-core machine gets 1): ask for 2 before its pools are built.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel is not installed (nox -s gptqmodel installs it)")

from defuser.engine.experts import DefusedExperts  # noqa: E402
from tests.downstream.conftest import calibration_texts  # noqa: E402

pytestmark = pytest.mark.slow

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_gptqmodel_quantizes_every_expert_projection_on_the_cpu(model_type, tiny_checkpoint, monkeypatch, tmp_path):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.looper import stage_layer
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    import defuser

    monkeypatch.chdir(tmp_path)  # GPTQModel writes its quantization logs under ./logs
    calls: dict[str, int] = {"replace_fused_blocks": 0, "convert_model": 0, "materialize_model": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in ("replace_fused_blocks", "convert_model"):
        monkeypatch.setattr(defuser, name, counting(name, getattr(defuser, name)))
    monkeypatch.setattr(stage_layer, "materialize_model", counting("materialize_model", stage_layer.materialize_model))

    folder = tiny_checkpoint(model_type)
    model = GPTQModel.load(str(folder), QuantizeConfig(bits=4, group_size=16))
    assert calls["replace_fused_blocks"] >= 1 and calls["convert_model"] >= 1
    layers = model.model.model.layers
    experts = [layer.mlp.experts for layer in layers]
    assert all(isinstance(module, DefusedExperts) for module in experts), [type(m).__name__ for m in experts]
    assert not any(hasattr(module, "gate_up_proj") for module in experts)

    model.quantize(calibration_texts(), batch_size=4, backend=BACKEND.TORCH)
    assert calls["materialize_model"] >= len(layers)
    for index, layer in enumerate(model.model.model.layers):
        for expert in range(len(layer.mlp.experts)):
            for projection in PROJECTIONS:
                path = f"model.layers.{index}.mlp.experts.{expert}.{projection}"
                quantized = model.model.get_submodule(path)
                assert isinstance(quantized, BaseQuantLinear), f"{path} is {type(quantized).__name__}"
    # The quantized model saves per-expert quantized tensors and loads back for inference.
    saved = folder.parent / f"{model_type}-gptq"
    model.save(str(saved))
    keys = _safetensors_keys(saved)
    assert "model.layers.0.mlp.experts.0.gate_proj.qweight" in keys
    assert not [key for key in keys if key.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    quantized = GPTQModel.load(str(saved), device="cpu", backend=BACKEND.TORCH)
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = quantized.model(input_ids=ids).logits
    assert logits.shape[-1] == quantized.model.config.vocab_size and torch.isfinite(logits).all()


def _safetensors_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys
