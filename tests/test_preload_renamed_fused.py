"""A fused checkpoint already in the model's names, loaded into pre-load patched classes when a
stock renaming of the model's mapping also matches those names.

DeepSeek-OCR-2 and Unlimited-OCR rename ``(^|model\\.)layers\\.`` to ``language_model.layers.``
for their original checkpoints; it matches ``language_model.layers.`` too.  transformers then
loads such a key under its own name (a key of the fused model), which a defused model does not
have: the fused experts tensors once went unexpected and the experts stayed randomly
initialised.  Here a tiny Mixtral gets such a renaming so the case runs on every release.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import conversion_mapping, core_model_loading
from transformers.core_model_loading import WeightRenaming

import defuser
from defuser.plugin import tiny_inputs


def _tiny_mixtral() -> torch.nn.Module:
    from defuser_testkit.conformance import cases_for

    try:
        family = importlib.import_module("defuser_mixtral.hooks").plugin
    except ImportError:
        pytest.skip("plugin 'mixtral' is not installed")
    cases, unavailable = cases_for(family)
    if "mixtral" not in cases:
        pytest.skip(unavailable.get("mixtral", "mixtral has no tiny model"))
    return cases["mixtral"]().eval()


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def misfiring_renaming() -> Iterator[None]:
    """Mixtral's stock mapping with a renaming for legacy keys that also matches its own names."""
    stock = conversion_mapping.get_checkpoint_conversion_mapping("mixtral")
    legacy = WeightRenaming(r"(^|model\.)layers\.", r"\1decoder.layers.")
    conversion_mapping.register_checkpoint_conversion_mapping("mixtral", [legacy, *(stock or [])], overwrite=True)
    try:
        yield
    finally:
        conversion_mapping.register_checkpoint_conversion_mapping("mixtral", stock or [], overwrite=True)


@pytest.mark.usefixtures("misfiring_renaming")
def test_fused_checkpoint_loads_into_defused_blocks_when_a_renaming_misfires(tmp_path: Path) -> None:
    stock = _tiny_mixtral()
    inputs = tiny_inputs(stock)
    reference = _output(stock, inputs)
    stock.save_pretrained(tmp_path, save_original_format=False)
    # Stock transformers loads each key under its own name when its renamed one is no key.
    plain = type(stock).from_pretrained(tmp_path, config=copy.deepcopy(stock.config)).eval()
    torch.testing.assert_close(_output(plain, inputs), reference, atol=1e-5, rtol=0)

    with defuser.defused_blocks("mixtral"):
        loaded, info = type(stock).from_pretrained(
            tmp_path, config=copy.deepcopy(stock.config), output_loading_info=True
        )
    assert not info["missing_keys"], sorted(info["missing_keys"])
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])
    assert any(name.endswith("experts.0.gate_proj") for name, _ in loaded.named_modules())
    torch.testing.assert_close(_output(loaded.eval(), inputs), reference, atol=1e-5, rtol=0)
    # Restored with the patch: transformers renames keys as it did.
    assert not hasattr(core_model_loading.rename_source_key, "_defuser_original")
