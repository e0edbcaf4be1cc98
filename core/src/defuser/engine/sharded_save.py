"""Saving a model whose defused experts are split by expert over the ranks.

Under expert parallel each rank holds only its experts as plain tensors (see
:mod:`defuser.engine.sharded`), which transformers' gathering for ``save_pretrained`` (it
gathers DTensors) does not see: the checkpoint would hold rank 0's experts only.  The model gets
an instance-level wrapper of ``gather_sharded_state_dict_for_save`` that, after transformers'
own gathering, collects every rank's experts over the expert-parallel group, module by module in
the same order on every rank, so the writing rank has all of them under their model-wide names.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["all_experts", "gather_held_experts_on_save"]

logger = logging.getLogger(__name__)

_MARK = "_defuser_gathers_held_experts"


def all_experts(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every expert of every held-experts module of ``model`` (gathered over
    each module's expert-parallel group; every rank must call this).  Ranks that write nothing
    pass an empty ``state_dict`` and get it back empty."""
    from defuser.engine.sharded import HeldExperts, expert_parameters

    writing = bool(state_dict)
    for path, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if not isinstance(module, HeldExperts):
            continue
        group = module._defuser_sharded.mesh.get_group()
        size = torch.distributed.get_world_size(group)
        count = module.num_experts
        tensors: dict[tuple[str, str], list[torch.Tensor]] = {}
        for projection, _, tensor_name, tensor in expert_parameters(module):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            tensors.setdefault((projection, tensor_name), []).append(local.detach())
        for (projection, tensor_name), pieces in tensors.items():
            stacked = torch.stack(pieces).contiguous()
            gathered = [torch.empty_like(stacked) for _ in range(size)]
            torch.distributed.all_gather(gathered, stacked, group=group)
            if not writing:
                continue
            for rank, block in enumerate(gathered):
                for index in range(count):
                    key = f"{path}.{rank * count + index}.{projection}.{tensor_name}"
                    state_dict[key] = block[index].cpu().contiguous()
    return state_dict


def gather_held_experts_on_save(model: nn.Module) -> None:
    """Wrap ``model.gather_sharded_state_dict_for_save`` so saves include every rank's experts
    (idempotent; a model without that method, transformers before 5.24, is left alone)."""
    if model.__dict__.get(_MARK) or not hasattr(model, "gather_sharded_state_dict_for_save"):
        return
    original = model.gather_sharded_state_dict_for_save

    def gather_sharded_state_dict_for_save(
        model_to_save: nn.Module, state_dict: dict, *args: Any, **kwargs: Any
    ) -> dict:
        gathered = original(model_to_save, state_dict, *args, **kwargs)
        return all_experts(model_to_save, gathered)

    model.__dict__["gather_sharded_state_dict_for_save"] = gather_sharded_state_dict_for_save
    model.__dict__[_MARK] = True
