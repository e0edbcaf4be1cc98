"""Derive the module paths GPTQModel's model definitions quantize, for every model type a defuser
plugin claims, into tests/data/gptqmodel_paths.json (read by tests/test_gptqmodel_paths.py).

Run it in an environment with GPTQModel and defuser installed (`nox -s gptqmodel` builds one):

    python scripts/gptqmodel_paths.py [OUTPUT]

For each definition: the decoder-layer containers (``model.layers``) and, per module of a layer,
its path relative to the layer (``mlp.experts.{expert_index}.gate_proj``) and whether GPTQModel
quantizes it (``:!`` and capture-only entries are not quantized, only run).  Only data is kept:
no GPTQModel code.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gptqmodel_paths.json"
# GPTQModel flags: ":!" runs without quantizing, ":?" is capture-only.
_NOT_QUANTIZED = (":!", ":?")


def derive() -> dict:
    """The expected paths of every GPTQModel definition for a model type a defuser plugin claims."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    from gptqmodel.models.auto import MODEL_MAP

    from defuser.plugins import list_plugins

    claimed = {support.model_type for p in list_plugins() if p.info for support in p.info.model_types}
    definitions = {}
    for model_type in sorted(claimed & set(MODEL_MAP)):
        cls = MODEL_MAP[model_type]
        if not getattr(cls, "module_tree", None):
            continue
        modules = []
        for block in cls.build_layer_modules(cls.module_tree, include_capture_only=True):
            for entry in block:
                flagged = next((flag for flag in _NOT_QUANTIZED if entry.endswith(flag)), None)
                path = entry[: -len(flagged)] if flagged else entry
                modules.append({"path": path, "quantized": flagged is None})
        definitions[model_type] = {
            "definition": cls.__name__,
            "loader": getattr(getattr(cls, "loader", None), "__name__", None),
            "layers": list(cls.extract_layers_node()),
            "strict": bool(getattr(cls, "layer_modules_strict", True)),
            "modules": modules,
        }
    return {"gptqmodel": version("gptqmodel"), "definitions": definitions}


def main(argv: list[str]) -> int:
    output = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUTPUT
    data = derive()
    output.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(data['definitions'])} definitions of GPTQModel {data['gptqmodel']} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
