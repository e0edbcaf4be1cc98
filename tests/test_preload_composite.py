"""Pre-load patching of composite models whose stock checkpoint mapping does more than stack
per-expert keys, and the check that a patched load never leaves defused weights missing quietly.

Each model type below once loaded its stock checkpoint with the defused experts missing
(randomly initialised, said only in transformers' load report): a converter reading several
fused tensors (Step3p7, Inkling2-Loop), a dense converter taking the renamed per-expert keys
(MiniMax-M3-VL), a converter splitting the experts between two modules (Ernie-4.5-VL).
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import defuser
from defuser.errors import ConversionError
from defuser.plugin import tiny_inputs

# (model type, the plugin declaring it)
COMPOSITE = [
    ("inkling2_loop", "inkling"),
    ("inkling2_loop_text", "inkling"),
    ("minimax_m3_vl", "minimax"),
    ("step3p7", "step"),
    ("ernie4_5_vl_moe", "ernie"),
]


def _tiny(model_type: str, plugin: str) -> torch.nn.Module:
    """The plugin's tiny ``model_type`` model (skipped where this release or install lacks it)."""
    from defuser_testkit.conformance import cases_for

    try:
        family = importlib.import_module(f"defuser_{plugin}.hooks").plugin
    except ImportError:
        pytest.skip(f"plugin {plugin!r} is not installed")
    cases, unavailable = cases_for(family)
    if model_type not in cases:
        pytest.skip(unavailable.get(model_type, f"{model_type!r} has no tiny model"))
    return cases[model_type]().eval()


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize(("model_type", "plugin"), COMPOSITE, ids=[model_type for model_type, _ in COMPOSITE])
def test_patched_load_of_stock_checkpoint_loads_every_key(model_type: str, plugin: str, tmp_path: Path) -> None:
    stock = _tiny(model_type, plugin)
    inputs = tiny_inputs(stock)
    reference = _output(stock, inputs)
    stock.save_pretrained(tmp_path)
    with defuser.defused_blocks(model_type):
        loaded, info = type(stock).from_pretrained(
            tmp_path, config=copy.deepcopy(stock.config), output_loading_info=True
        )
    assert not info["missing_keys"], sorted(info["missing_keys"])
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])
    torch.testing.assert_close(_output(loaded.eval(), inputs), reference, atol=1e-5, rtol=0)


def _mixtral_checkpoint(tmp_path: Path, edit) -> tuple[torch.nn.Module, Path]:
    """A stock tiny Mixtral saved per expert, its tensors rewritten by ``edit`` (name -> new name or None)."""
    stock = _tiny("mixtral", "mixtral")
    stock.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    edited = {edit(name): tensor for name, tensor in tensors.items() if edit(name) is not None}
    assert edited.keys() != tensors.keys()
    save_file(edited, file, metadata={"format": "pt"})
    return stock, tmp_path


def test_patched_load_raises_naming_experts_keys_it_could_not_place(tmp_path: Path) -> None:
    # An expert projection under a name no mapping knows: the checkpoint holds it, nothing takes it.
    stock, folder = _mixtral_checkpoint(tmp_path, lambda name: name.replace(".experts.0.w1.", ".experts.0.w9."))
    with defuser.defused_blocks("mixtral"), pytest.raises(ConversionError, match=r"experts\.0\.gate_proj\.weight"):
        type(stock).from_pretrained(folder, config=copy.deepcopy(stock.config))
    # Restored: loads are no longer checked.
    from transformers import PreTrainedModel

    assert not hasattr(PreTrainedModel._adjust_missing_and_unexpected_keys, "_defuser_original")


def test_patched_load_warns_when_checkpoint_lacks_experts_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stock, folder = _mixtral_checkpoint(tmp_path, lambda name: None if ".experts.0.w1." in name else name)
    with defuser.defused_blocks("mixtral"), caplog.at_level(logging.WARNING, logger="defuser"):
        type(stock).from_pretrained(folder, config=copy.deepcopy(stock.config))
    warned = [record.getMessage() for record in caplog.records if record.name.startswith("defuser")]
    assert any("experts.0.gate_proj.weight" in message and "missing" in message for message in warned), warned
