"""Offline conversion of a local safetensors checkpoint between the fused and the per-expert
layout (``defuser convert``), tensor by tensor, without loading the model.

The model is built on the meta device from ``config.json`` only to learn which checkpoint keys
are fused and how: the installed plugins' candidates give each fused tensor's layout, the
engine's own slicing functions (:mod:`defuser.engine.layout`) cut it per expert, and converting
the meta model with :func:`defuser.convert_model` gives the names and shapes the result must
have; a plan that disagrees with it is refused before anything is written.  The per-expert
tensors are written under transformers' stock per-expert names where it has them (Mixtral's
``block_sparse_moe.experts.N.w1``), else the converted model's own (``save_pretrained`` of the
converted model writes the stock fused layout instead where stock checkpoints are fused);
``--reverse`` reads either those or the converted model's state-dict names.

Per-expert slices that are contiguous byte ranges of the fused tensor as stored (a zero-copy
layout: stacked ``[E, 2I, H]`` gate-up halves, ``[E, H, I]`` down), and every tensor copied
unchanged, are copied as bytes by the kernel (:mod:`~defuser.offline.ranges`), never decoded.
Other fused tensors (interleaved, stored transposed, with identity rows) are decoded: read with
plain file reads into one buffer each.  ``safetensors.safe_open`` maps
the whole file instead, and every page touched while reading a shard stays in the process's
resident memory until the file is closed, so a multi-GB shard would cost its full size.  The
output is written by a streaming safetensors writer (header first, computed from the plan, then
each tensor's bytes as soon as it exists), so peak memory is one fused tensor plus one expert's
slice per job, whatever the checkpoint size; output shards are written by ``jobs`` processes
at a time, each shard the same bytes whatever the count.  Everything goes to a temporary folder beside the
destination that is renamed into place only when complete and verified.

Modules, bottom up: :mod:`~defuser.offline.safetensors_io` (the file format),
:mod:`~defuser.offline.checkpoint` (source and destination folders),
:mod:`~defuser.offline.model_layout` (fused tensors of the model and how they split),
:mod:`~defuser.offline.plan` (every step decided, and told, before writing),
:mod:`~defuser.offline.workspace` (the marked temporary folder, swapping it into place, and
removing what killed runs left), :mod:`~defuser.offline.ranges` (byte ranges copied by the
kernel), :mod:`~defuser.offline.parts` (one conversion on several machines, merged after),
:mod:`~defuser.offline.execute` (writing in parallel jobs, verifying, renaming into place).
"""

from defuser.offline.checkpoint import Checkpoint, open_checkpoint
from defuser.offline.execute import (
    ConversionReport,
    ExecutionReport,
    carry_out,
    convert_checkpoint,
    execute_plan,
    merge_parts,
)
from defuser.offline.model_layout import FusedSpec, ModelLayout, describe_model_layout
from defuser.offline.parts import Part, parse_part, part_folder
from defuser.offline.plan import ConversionPlan, ShardPlan, Step, format_plan, plan_conversion
from defuser.offline.safetensors_io import (
    DTYPE_SIZES,
    OfflineConversionError,
    OutputTensor,
    TensorEntry,
    read_safetensors_header,
)

__all__ = [
    "DTYPE_SIZES",
    "Checkpoint",
    "ConversionPlan",
    "ConversionReport",
    "ExecutionReport",
    "FusedSpec",
    "ModelLayout",
    "OfflineConversionError",
    "OutputTensor",
    "Part",
    "ShardPlan",
    "Step",
    "TensorEntry",
    "carry_out",
    "convert_checkpoint",
    "describe_model_layout",
    "execute_plan",
    "format_plan",
    "merge_parts",
    "open_checkpoint",
    "parse_part",
    "part_folder",
    "plan_conversion",
    "read_safetensors_header",
]
