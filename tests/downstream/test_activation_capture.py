"""Activation capture with plain forward hooks on the per-expert Linears of a defused model:
each expert sees exactly the tokens the router sends it (no third-party package needed)."""

from __future__ import annotations

import torch

from defuser import convert_model
from defuser.tiny import build_tiny_model, tiny_inputs


def test_forward_hooks_capture_each_experts_tokens():
    model = build_tiny_model("qwen3_moe")
    assert convert_model(model)
    inputs = tiny_inputs(model)
    layer = model.model.layers[0].mlp
    captured: dict[int, list[torch.Tensor]] = {}
    routed: list[torch.Tensor] = []

    def capture(index):
        def hook(module, args, output):
            captured.setdefault(index, []).append(args[0].detach())

        return hook

    handles = [expert.gate_proj.register_forward_hook(capture(index)) for index, expert in enumerate(layer.experts)]
    handles.append(layer.gate.register_forward_hook(lambda module, args, output: routed.append(output[-1])))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    top_k_index = routed[0].reshape(-1, routed[0].shape[-1])
    counts = torch.bincount(top_k_index.reshape(-1), minlength=len(layer.experts)).tolist()
    seen = [sum(chunk.shape[0] for chunk in captured.get(index, [])) for index in range(len(layer.experts))]
    assert seen == counts, "each expert's hook saw exactly its routed tokens"
    assert sum(seen) == top_k_index.numel()
