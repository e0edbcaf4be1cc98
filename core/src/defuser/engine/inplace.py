"""Re-laying out a fused expert tensor inside its own storage (``cleanup_original=True``).

Transposed or interleaved experts cannot be ``nn.Linear`` views of the fused tensor: each
expert's weights must be rewritten in ``[out, in]`` order.  Copying a whole fused tensor
(what happens without ``cleanup_original``) needs a second tensor of its size.  But each
expert's block keeps the same bytes in both orders, only permuted, so when the fused tensor
may be overwritten the rewrite can happen in place: one expert at a time, read in the new
order into a buffer of one expert's size and written back over the same block.  The
per-expert weights are then contiguous views of the fused storage and memory grows by one
expert's block.

In place is used only when nothing else can see the bytes change: the fused tensor is a plain
``nn.Parameter`` held by this module alone (not tied, no other tensor of the model on its
storage, no reference outside the engine's own: counted on the storage), contiguous, one
block per expert, on a real device (``meta`` allocates nothing anyway), and not loaded from an
accelerate offload store (those are copied as before: the store keeps the original).
Otherwise the copy path runs.

A failure part-way (an exception, running out of memory, an interrupt) writes the experts
already rewritten back in the original order (the inverse permutation) before the error
propagates; once complete, the inverse is registered with the conversion's snapshot, so a
later failure of the same module restores the fused tensor's bytes too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from defuser.engine.candidates import ExpertsLayout
from defuser.engine.transaction import ModuleSnapshot, releasing_snapshot

__all__ = ["Relayout", "in_place_relayout", "relayout_experts"]

logger = logging.getLogger(__name__)

# Told which fused tensor ("first", "second", "down", "first_bias"), the tensor, and how one
# expert's block reads in nn.Linear order (a view); answers the re-laid-out stack (views of the
# same storage, ``[E, *read(block).shape]``) or None when the tensor must be copied instead.
Relayout = Callable[[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor | None]


def _storage_references(tensor: torch.Tensor) -> int | None:
    """How many tensors hold ``tensor``'s storage (None where torch does not tell)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    # The storage object made to ask holds a reference of its own.
    return count(tensor.untyped_storage()._cdata) - 1


def _copy_block(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``; tests replace it to inject faults part-way."""
    target.copy_(source)


def relayout_experts(
    fused: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, Callable[[], None]]:
    """Rewrite each expert block ``fused[e]`` as ``read(fused[e])`` laid out densely, in place.

    ``fused`` is contiguous ``[E, ...]``; ``read`` maps a block to a view of it with the same
    number of elements.  Returns the new stack ``[E, *read(fused[0]).shape]`` (a view of
    ``fused``'s storage) and a function that puts the original order back.  Uses a buffer of
    one block.  On any failure the experts already rewritten are put back before it propagates.
    """
    experts = fused.shape[0]
    blocks = fused.view(experts, -1)
    shape = read(fused[0]).shape
    buffer = torch.empty(shape, dtype=fused.dtype, device=fused.device)
    flat = buffer.view(-1)
    done = 0
    buffered = -1  # the expert whose new order the buffer holds
    try:
        for expert in range(experts):
            _copy_block(buffer, read(fused[expert]))
            buffered = expert
            _copy_block(blocks[expert], flat)
            done = expert + 1
    except BaseException:
        # The buffered expert may or may not have been written back: writing its buffer
        # through the block's original-order view restores it either way.
        if buffered == done:
            read(fused[buffered]).copy_(buffer)
        _restore(fused, read, blocks, buffer, done)
        raise

    def undo() -> None:
        _restore(fused, read, blocks, torch.empty(shape, dtype=fused.dtype, device=fused.device), experts)

    return blocks.view(experts, *shape), undo


def _restore(
    fused: torch.Tensor,
    read: Callable[[torch.Tensor], torch.Tensor],
    blocks: torch.Tensor,
    buffer: torch.Tensor,
    count: int,
) -> None:
    """Put experts ``0..count-1`` (rewritten) back in the original order."""
    flat = buffer.view(-1)
    for expert in reversed(range(count)):
        flat.copy_(blocks[expert])
        read(fused[expert]).copy_(buffer)


def _sole_holder(snapshot: ModuleSnapshot, parameter: nn.Parameter, tensor: torch.Tensor) -> bool:
    """True when the only tensors on ``parameter``'s storage are the ones the engine holds:
    the parameter, the snapshot's record of it, and ``tensor`` (the engine's detached view)."""
    holders = {id(parameter): parameter, id(tensor): tensor}
    data = snapshot.data_of(parameter)
    if data is not None:
        holders[id(data)] = data
    references = _storage_references(parameter)
    return references is not None and references == len(holders)


def in_place_relayout(fused_module: nn.Module, layout: ExpertsLayout) -> Relayout | None:
    """The :data:`Relayout` for the fused tensors of ``fused_module``, or None when the conversion
    does not allow rewriting them (no ``cleanup_original``, or a layout read as views anyway)."""
    if layout.flattened or releasing_snapshot(fused_module) is None:
        return None
    names = {
        "first": layout.first_name,
        "second": layout.up_name,
        "down": layout.down_name,
        "first_bias": f"{layout.first_name}_bias",
    }

    def relayout(role: str, tensor: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        owner_path, _, leaf = names[role].rpartition(".")
        owner = fused_module.get_submodule(owner_path) if owner_path else fused_module
        snapshot = releasing_snapshot(owner)
        parameter = snapshot.owned(owner, leaf) if snapshot is not None else None
        if (
            parameter is None
            or tensor.device.type == "meta"
            or tensor.shape[0] != layout.num_experts
            or tensor.numel() == 0
            or not tensor.is_contiguous()
            or tensor.data_ptr() != parameter.data_ptr()
            or tensor.shape != parameter.shape
            or not _sole_holder(snapshot, parameter, tensor)
        ):
            return None
        with torch.no_grad():
            stacked, undo = relayout_experts(tensor, read)
        snapshot.on_restore(undo)
        logger.debug("re-laid out %s of %s in place", names[role], type(fused_module).__name__)
        return stacked

    return relayout
