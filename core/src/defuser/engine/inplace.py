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
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from defuser.engine.candidates import ExpertsLayout
from defuser.engine.transaction import ModuleSnapshot, releasing_snapshot

__all__ = ["Relayout", "in_place_relayout", "relayout_experts", "relayout_parameter"]

logger = logging.getLogger(__name__)

# Told which fused tensor ("first", "second", "down", "first_bias"), the tensor, and how its
# expert blocks differ from nn.Linear order (transposed; gate and up rows interleaved); answers
# the re-laid-out stack (views of the same storage, see :func:`relayout_experts`) or None when
# the tensor must be copied instead.
Relayout = Callable[[str, torch.Tensor, bool, bool], torch.Tensor | None]


def _storage_references(tensor: torch.Tensor) -> int | None:
    """How many tensors hold ``tensor``'s storage (None where torch does not tell)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    # The storage object made to ask holds a reference of its own.
    return count(tensor.untyped_storage()._cdata) - 1


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, one thread per copy on the CPU.

    A rewrite makes two copies per expert block (a few MB): torch would split each across its
    threads, and with other work on the machine those threads wait for each other at every one
    of thousands of copies (5x slower than one thread, measured).  Copies of whole rows go
    through numpy's single-threaded copy of the raw bytes instead; a transposing copy into a
    contiguous block already takes torch's single-threaded tiled path.
    """
    rows_of_bytes = source.stride(-1) == 1 and target.stride(-1) == 1 and source.dtype == target.dtype
    if target.device.type == "cpu" and source.device.type == "cpu" and rows_of_bytes and target.ndim:
        import numpy

        numpy.copyto(target.view(torch.uint8).numpy(), source.view(torch.uint8).numpy())
        return
    target.copy_(source)


def _copy_block(target: torch.Tensor, source: torch.Tensor) -> None:
    """:func:`_copy` of one step of a rewrite; tests replace it to inject faults part-way."""
    _copy(target, source)


@dataclass(frozen=True)
class _BlockOrder:
    """How one expert's block ``[rows, columns]`` (or a bias ``[rows]``) becomes ``nn.Linear``
    order: transposed first, then (``deinterleave``) its even rows before its odd ones."""

    block_shape: tuple[int, ...]
    transposed: bool
    deinterleave: bool

    @property
    def oriented_shape(self) -> tuple[int, ...]:
        """The block transposed where needed: ``[out, in]`` in the fused row order."""
        return self.block_shape[::-1] if self.transposed else self.block_shape

    @property
    def new_shape(self) -> tuple[int, ...]:
        """One expert's block in nn.Linear order (``[2, out/2, ...]`` when de-interleaved)."""
        rows, *rest = self.oriented_shape
        return (2, rows // 2, *rest) if self.deinterleave else self.oriented_shape

    def oriented(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` (original order) as a view ``[out, in]``: copied into a contiguous tensor,
        a 2D transpose takes torch's tiled path."""
        return block.t() if self.transposed else block

    def write_original(self, block: torch.Tensor, oriented: torch.Tensor) -> None:
        """Write a contiguous oriented block back in the original order (the tiled path again)."""
        block.copy_(oriented.t() if self.transposed else oriented)

    def rows_in_new_order(self, oriented: torch.Tensor) -> torch.Tensor:
        """A view of an oriented block with its rows in the new order (shaped :attr:`new_shape`)."""
        if not self.deinterleave:
            return oriented
        rows, *rest = oriented.shape
        return oriented.view(rows // 2, 2, *rest).transpose(0, 1)


def relayout_experts(
    fused: torch.Tensor, transposed: bool, deinterleave: bool, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, Callable[[], None]]:
    """Rewrite each expert block of contiguous ``fused`` ``[E, ...]`` in ``nn.Linear`` order, in place.

    ``transposed``: a block ``[in, out]`` becomes ``[out, in]``; ``deinterleave``: the even rows
    (of the transposed block) go first, then the odd ones, giving ``[2, out/2, in]`` (a bias
    block ``[2, out/2]``).  Returns the new stack ``[E, *new block shape]`` (a view of
    ``fused``'s storage, each block contiguous) and a function putting the original order back.
    Each expert goes through a buffer of one block: a 2D transposing copy into it (torch's
    tiled transpose), then a copy of whole rows back over the block; ``scratch`` (bytes on the
    same device) serves as that buffer when it is large enough.  On any failure the experts
    already rewritten are put back before it propagates.
    """
    experts = fused.shape[0]
    order = _BlockOrder(tuple(fused.shape[1:]), transposed, deinterleave)
    blocks = fused.view(experts, -1)
    buffer = _buffer(order.oriented_shape, fused, scratch)
    done = 0
    buffered = -1  # the expert whose block the buffer holds
    try:
        for expert in range(experts):
            _copy_block(buffer, order.oriented(fused[expert]))
            buffered = expert
            _copy_block(blocks[expert].view(order.new_shape), order.rows_in_new_order(buffer))
            done = expert + 1
    except BaseException:
        # The buffered expert may or may not have been written: the buffer restores it either way.
        if buffered == done:
            order.write_original(fused[buffered], buffer)
        _restore(fused, order, blocks, buffer, done)
        raise

    # The undo waits in the conversion's snapshot until the whole conversion ends: it keeps
    # the buffer's shape, never the buffer, or every module's buffer would stay alive that long.
    buffer_shape, dtype, device = tuple(buffer.shape), buffer.dtype, buffer.device
    del buffer

    def undo() -> None:
        _restore(fused, order, blocks, torch.empty(buffer_shape, dtype=dtype, device=device), experts)

    return blocks.view(experts, *order.new_shape), undo


def _buffer(shape: tuple[int, ...], like: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device: ``scratch``'s bytes if they suffice."""
    size = math.prod(shape) * like.element_size()
    if scratch is None or scratch.device != like.device or scratch.numel() < size:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch[:size].view(like.dtype).view(shape)


class _Scratch:
    """One buffer reused by the rewrites of a module's tensors (grown when one needs more)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def bytes_for(self, block: torch.Tensor) -> torch.Tensor:
        """Bytes on ``block``'s device for at least one copy of it."""
        size = block.numel() * block.element_size()
        if self.buffer is None or self.buffer.device != block.device or self.buffer.numel() < size:
            self.buffer = None  # freed before the larger one is made
            self.buffer = torch.empty(size, dtype=torch.uint8, device=block.device)
        return self.buffer


def _restore(fused: torch.Tensor, order: _BlockOrder, blocks: torch.Tensor, buffer: torch.Tensor, count: int) -> None:
    """Put experts ``0..count-1`` (rewritten) back in the original order, the last first."""
    for expert in reversed(range(count)):
        _copy(order.rows_in_new_order(buffer), blocks[expert].view(order.new_shape))
        order.write_original(fused[expert], buffer)


def _sole_holder(snapshot: ModuleSnapshot, parameter: nn.Parameter, tensor: torch.Tensor) -> bool:
    """True when the only tensors on ``parameter``'s storage are the ones the engine holds:
    the parameter, the snapshot's record of it, and ``tensor`` (the engine's detached view)."""
    holders = {id(parameter): parameter, id(tensor): tensor}
    data = snapshot.data_of(parameter)
    if data is not None:
        holders[id(data)] = data
    references = _storage_references(parameter)
    return references is not None and references == len(holders)


def relayout_parameter(
    owner: nn.Module,
    name: str,
    tensor: torch.Tensor,
    experts: int,
    transposed: bool,
    deinterleave: bool = False,
    scratch: _Scratch | None = None,
) -> torch.Tensor | None:
    """Re-lay out ``owner``'s fused parameter ``name`` in place with :func:`relayout_experts`
    (``tensor``: the engine's detached view of it; ``scratch``: a buffer shared with the other
    tensors of the module); None (nothing done) when the conversion does not allow it (see the
    module docstring).  On success the parameter leaves ``owner`` at once, so its old shape
    never shows the new bytes; the conversion's snapshot puts both back if the module's
    conversion fails later."""
    snapshot = releasing_snapshot(owner)
    parameter = snapshot.owned(owner, name) if snapshot is not None else None
    if (
        snapshot is None
        or parameter is None
        or tensor.device.type == "meta"
        or tensor.ndim not in (2, 3)
        or (tensor.ndim == 2 and transposed)
        or tensor.shape[0] != experts
        or tensor.numel() == 0
        or not tensor.is_contiguous()
        or tensor.data_ptr() != parameter.data_ptr()
        or tensor.shape != parameter.shape
        or not _sole_holder(snapshot, parameter, tensor)
    ):
        return None
    with torch.no_grad():
        buffer = scratch.bytes_for(tensor[0]) if scratch is not None else None
        stacked, undo = relayout_experts(tensor, transposed, deinterleave, buffer)
    snapshot.on_restore(undo)
    owner._parameters[name] = None
    logger.debug("re-laid out %s of %s in place", name, type(owner).__name__)
    return stacked


def in_place_relayout(fused_module: nn.Module, layout: ExpertsLayout) -> Relayout | None:
    """The :data:`Relayout` for the fused tensors of experts module ``fused_module``, or None when
    the conversion does not allow rewriting them (no ``cleanup_original``, flattened storage)."""
    if layout.flattened or releasing_snapshot(fused_module) is None:
        return None
    names = {
        "first": layout.first_name,
        "second": layout.up_name,
        "down": layout.down_name,
        "first_bias": f"{layout.first_name}_bias",
    }

    # One buffer for all the module's tensors, sized by the first (gate-up: the largest block).
    # Buffers of varying sizes, each freed before the next, leave the C heap fragmented: RSS
    # grew by 1.5 blocks instead of one (measured, glibc).
    scratch = _Scratch()

    def relayout(role: str, tensor: torch.Tensor, transposed: bool, deinterleave: bool) -> torch.Tensor | None:
        owner_path, _, leaf = names[role].rpartition(".")
        owner = fused_module.get_submodule(owner_path) if owner_path else fused_module
        return relayout_parameter(owner, leaf, tensor, layout.num_experts, transposed, deinterleave, scratch)

    return relayout
