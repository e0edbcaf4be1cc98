"""Checkpoint keys in and out of defused models, through transformers' weight conversion machinery.

Loading (a model built after ``replace_fused_blocks``): transformers renames each checkpoint
key, then hands it to at most one converter.  :class:`SplitFusedExperts` and
:class:`SplitFusedDense` look up the module the key belongs to and, when it is defused, emit
one tensor per expert and projection, read with that module's own layout (transposed,
interleaved, biased, flattened, with identity rows).

Saving: ``save_pretrained`` reverses the conversions the model knows of.  Stock mappings that
merge per-expert checkpoint keys (``experts.*.w1.weight`` -> ``experts.gate_up_proj``) tell
which per-expert names a checkpoint uses; :func:`per_expert_renames` turns them into renamings
whose reverse writes the defused per-expert keys under those names.  Every other defused
module is written in its fused layout by :mod:`defuser.engine.save`.  :func:`attach_save_mapping`
gives a converted model both, so plain transformers loads the saved checkpoint.  Renamings are
written as transformers' own are (no regex back-references).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

from defuser._hf import converter_patterns
from defuser.engine.candidates import ExpertsLayout, FusedTensor
from defuser.engine.layout import orient, split_gate_up

__all__ = [
    "PerExpertRenaming",
    "SplitFusedDense",
    "SplitFusedExperts",
    "SplitFusedParallel",
    "attach_save_mapping",
    "expert_projection_renames",
    "fuses_dense_halves",
    "fuses_expert_keys",
    "is_plain_split",
    "leaving_per_expert_keys",
    "per_expert_renames",
    "split_on_load_converter",
    "stock_save_conversions",
    "takes_per_expert_keys",
    "unescape_pattern",
]

logger = logging.getLogger(__name__)

# A source pattern no key can match: the reverse of a load-only split (see below).
_NEVER = r"(?!)defuser-never"


def _first_tensor(input_dict: dict[str, Any]) -> torch.Tensor:
    tensor = next(iter(input_dict.values()))
    return tensor[0] if isinstance(tensor, list) else tensor


def _owner(model: nn.Module | None, layer_name: str | None, suffix: str) -> tuple[str, nn.Module | None]:
    """The path of the module holding ``suffix`` in ``layer_name``, and the module (None when absent)."""
    if layer_name is None:
        return "", None
    if layer_name.endswith(suffix):
        path = layer_name[: -len(suffix)].rstrip(".")
    elif suffix.startswith("0.") and (held := re.fullmatch(rf"(.*)\.\d+\.{re.escape(suffix[2:])}", layer_name)):
        # Experts held in part (expert parallel) are reached through their first expert's key.
        path = held[1]
    else:
        return "", None
    if model is None:
        return path, None
    # The key may still carry (or lack) the base model's prefix when a head model loads a
    # base checkpoint or the other way round.
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [path]
    if prefix:
        candidates += [f"{prefix}.{path}" if path else prefix, path.removeprefix(f"{prefix}.")]
    for candidate in candidates:
        try:
            return candidate, model.get_submodule(candidate) if candidate else model
        except AttributeError:
            continue
    return path, None


def _defused_owner(
    op: ConversionOps, kwargs: dict[str, Any], kind: type, what: str, target: str | None = None
) -> tuple[str, nn.Module]:
    """Path and module of the key a converter ``op`` was handed (``target``, default ``op.target``,
    ends it); a ValueError naming the key when that module is not a ``kind``."""
    layer_name = kwargs.get("full_layer_name")
    path, module = _owner(kwargs.get("model"), layer_name, target or op.target)
    if not isinstance(module, kind):
        raise ValueError(f"{op!r}: {layer_name!r} does not belong to a {what}")
    return path, module


class SplitFusedExperts(ConversionOps):
    """Split one fused experts tensor (``tensor_name``, possibly dotted or a ``*_bias``) of a
    defused experts module into per-expert ``{path}.{i}.{proj}.weight|bias`` tensors.

    The module's own :class:`ExpertsLayout` says how to read it; a checkpoint tensor stored in
    the other orientation than the module (Qwen3-VL-MoE's transposed experts) is recognised by
    its shape.  Rows past the last routed expert (LongCat's identity experts) are dropped.
    """

    def __init__(
        self,
        tensor_name: str,
        target: str = "0.gate_proj.weight",
        inputs: dict[str, str] | None = None,
        input_targets: dict[str, str] | None = None,
    ):
        self.tensor_name = tensor_name
        # The key the converter renames the fused key to (expert 0's first projection here):
        # transformers hands that name over, and it must be a key of the defused model.
        self.target = target
        # Where earlier operations of the converter produce several fused tensors (keyed by the
        # converter's target names): which fused tensor each one is.
        self.inputs = dict(inputs or {})
        # The defused key each of those target names ends with: given, each fused tensor is split
        # into the module its own target names (Ernie-4.5-VL's text and vision experts), else all
        # into the module of the key transformers hands over.
        self.input_targets = dict(input_targets or {})

    def __repr__(self) -> str:
        return f"SplitFusedExperts({self.tensor_name!r}, {self.target!r})"

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        from defuser.engine.distributed_preload import refuse_presliced_fused
        from defuser.engine.experts import DefusedExperts

        path, module = _defused_owner(self, kwargs, DefusedExperts, "defused experts module")
        groups: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {path: (module, {})}
        if not self.inputs:
            groups[path][1][self.tensor_name] = _first_tensor(input_dict)
        for key, value in input_dict.items() if self.inputs else ():
            owner_path, owner = path, module
            if key in self.input_targets:
                owner_path, owner = _defused_owner(
                    self,
                    {**kwargs, "full_layer_name": self._layer_of(kwargs.get("full_layer_name"), key)},
                    DefusedExperts,
                    "defused experts module",
                    self.input_targets[key],
                )
            groups.setdefault(owner_path, (owner, {}))[1][self.inputs[key]] = _first_tensor({key: value})
        result = {}
        for owner_path, (owner, pieces) in groups.items():
            refuse_presliced_fused(owner, owner_path, pieces)
            # Under expert parallel a module holds experts first_expert .. first_expert + num_experts - 1.
            first = owner.__dict__.get("first_expert", 0)
            for name, tensor in pieces.items():
                result.update(self.split(tensor, owner.layout, owner_path, _fused_shape(owner, name), name, first))
        return result

    def _layer_of(self, layer_name: str | None, key: str) -> str:
        """The full key of the converter's target name ``key``: ``layer_name`` is the first one's,
        with another expert index where expert parallel holds the module in part."""
        first = next(iter(self.inputs))
        target = self.input_targets.get(first, first)
        stem, after = first.removesuffix(target), target.partition(".")[2]
        held = re.fullmatch(rf"(.*){re.escape(stem)}[0-9]+\.{re.escape(after)}", layer_name or "")
        if held is None:
            raise ValueError(f"{self!r}: cannot tell which module {key!r} of {layer_name!r} belongs to")
        return held[1] + key

    def split(
        self,
        tensor: torch.Tensor,
        layout: ExpertsLayout,
        path: str,
        expected: tuple[int, ...] | None = None,
        tensor_name: str | None = None,
        first: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Per-expert tensors named ``{path}.{i}.{proj}.{weight|bias}`` from one fused ``tensor``
        (``tensor_name``, default the op's own), for experts ``first .. first + layout.num_experts - 1``."""
        tensor_name = tensor_name or self.tensor_name
        fused = _fused_tensor(layout, tensor_name)
        if fused is None:
            raise ValueError(f"{tensor_name!r} is not a tensor of the layout {layout}")
        experts = layout.num_experts
        if fused.is_bias:
            stacked = tensor.reshape(-1, tensor.shape[-1])[first : first + experts]
            halves = split_gate_up(stacked, layout, dim=-1) if fused.is_gate_up else (stacked,)
        else:
            if expected is not None and _is_swapped(tuple(tensor.shape), expected):
                tensor = tensor.transpose(-1, -2)  # the checkpoint holds the other orientation
            if layout.flattened:
                tensor = tensor.reshape(experts, -1, tensor.shape[-1])
            stacked = orient(tensor, fused.transposed)[first : first + experts]
            halves = split_gate_up(stacked, layout, dim=-2) if fused.is_gate_up else (stacked,)
        result = {}
        for index in range(experts):
            for key, half in zip(fused.keys(path, first + index), halves, strict=True):
                result[key] = half[index].clone()
        return result

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("SplitFusedExperts is applied on load only")


def _fused_tensor(layout: ExpertsLayout, name: str) -> FusedTensor | None:
    """The fused tensor ``name`` of ``layout``; a bias the checkpoint holds though the layout
    declares none is split as its weight's projections are."""
    return layout.tensor(name) or replace(layout, has_bias=True).tensor(name)


def _fused_shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """The shape the fused module held ``name`` in, when the defused module recorded it."""
    shapes = module.__dict__.get("_fused_tensor_shapes") or {}
    if name in shapes:
        return tuple(shapes[name])
    recorded = module.__dict__.get("_fused_shapes") or {}
    return tuple(recorded[name][0]) if name in recorded else None


def _is_swapped(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return shape != expected and len(shape) >= 2 and shape == (*expected[:-2], expected[-1], expected[-2])


class SplitFusedDense(ConversionOps):
    """Split a fused dense gate-up ``{path}.{fused_name}.{part}`` (``part``: weight or bias) of a
    split dense MLP into ``{path}.gate_proj.{part}`` and ``{path}.up_proj.{part}``, in the halves'
    order the MLP declares."""

    def __init__(self, fused_name: str, part: str):
        self.fused_name = fused_name
        self.part = part
        # The key the converter renames the fused key to (see SplitFusedExperts.target).
        self.target = f"gate_proj.{part}"

    def __repr__(self) -> str:
        return f"SplitFusedDense({self.fused_name!r}, {self.part!r})"

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        from defuser.engine.dense import split_dense_layout

        tensor = _first_tensor(input_dict)
        layer_name = kwargs.get("full_layer_name")
        path, module = _owner(kwargs.get("model"), layer_name, self.target)
        layout = None if module is None else split_dense_layout(module)
        if layout is None or layout.fused_name != self.fused_name:
            raise ValueError(f"{self!r}: {layer_name!r} does not belong to a split dense MLP")
        first, second = tensor.chunk(2, dim=0)
        gate, up = (first, second) if layout.gate_first else (second, first)
        prefix = f"{path}." if path else ""
        return {f"{prefix}gate_proj.{self.part}": gate.clone(), f"{prefix}up_proj.{self.part}": up.clone()}

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("SplitFusedDense is applied on load only")


class SplitFusedParallel(ConversionOps):
    """Split the stacked ``{path}.{weight_name}`` of a defused parallel-experts module into
    ``{path}.{i}.linear.weight``, read with the module's own :class:`ParallelLayout`."""

    def __init__(self, weight_name: str, target: str):
        self.weight_name = weight_name
        # The key the converter renames the fused key to (see SplitFusedExperts.target).
        self.target = target

    def __repr__(self) -> str:
        return f"SplitFusedParallel({self.weight_name!r}, {self.target!r})"

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        from defuser.engine.parallel import DefusedParallelExperts

        path, module = _defused_owner(self, kwargs, DefusedParallelExperts, "defused parallel-experts module")
        stacked = orient(_first_tensor(input_dict), module.layout.transposed)
        return {f"{path}.{index}.linear.weight": stacked[index].clone() for index in range(module.num_experts)}

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("SplitFusedParallel is applied on load only")


class _LoadOnlyConverter(WeightConverter):
    """A converter whose reverse (used by ``save_pretrained``) leaves keys alone: the defused
    per-expert keys are what a defused model saves."""

    def rename_source_key(self, source_key: str) -> tuple[str, str | None]:
        from defuser.engine.distributed_preload import held_target

        renamed, pattern = super().rename_source_key(source_key)
        # A rank holding a slice of the experts has no expert 0 to load a fused tensor through.
        return (held_target(renamed), pattern) if pattern is not None else (renamed, pattern)

    def reverse_transform(self) -> WeightRenaming:
        return WeightRenaming(source_patterns=_NEVER, target_patterns="unused")


def is_plain_split(converter: Any) -> bool:
    """True for a load-only converter that only splits a fused tensor of a defused module (no
    stock reordering before the split)."""
    operations = _operations(converter)
    return (
        isinstance(converter, _LoadOnlyConverter)
        and len(operations) == 1
        and isinstance(operations[0], (SplitFusedExperts, SplitFusedDense, SplitFusedParallel))
    )


def split_on_load_converter(
    source: str | list[str], target: str | list[str], operations: list[ConversionOps]
) -> WeightConverter:
    """A converter applying ``operations`` to keys matching ``source`` on load only.

    The matched part of a key is replaced by ``target`` to name what the operations receive as
    ``full_layer_name``; transformers hands a key over only when that name is a key of the model
    (a key of a module that is not defused keeps its own name and loads as it is)."""
    return _LoadOnlyConverter(source_patterns=source, target_patterns=target, operations=list(operations))


# A defused per-expert key: what per-expert checkpoint keys load as (renamed to defuser's names).
_PER_EXPERT_KEY = re.compile(r"[.][0-9]+[.](?:gate_proj|up_proj|down_proj)[.](?:weight|bias)$")


class _LeavesPerExpertKeys(WeightConverter):
    """A stock converter that takes no defused per-expert key: MiniMax-M3-VL's dense
    ``gate_proj`` + ``up_proj`` -> ``gate_up_proj`` concatenation would otherwise take the
    per-expert keys its checkpoint's ``experts.N.w1`` / ``w3`` load as."""

    def rename_source_key(self, source_key: str) -> tuple[str, str | None]:
        if _PER_EXPERT_KEY.search(source_key):
            return source_key, None
        return super().rename_source_key(source_key)


def takes_per_expert_keys(transform: Any) -> bool:
    """True for a stock converter whose sources match a defused per-expert key."""
    if not isinstance(transform, WeightConverter) or isinstance(transform, _LeavesPerExpertKeys):
        return False
    samples = [
        f"layers.0.mlp.experts.0.{projection}.{kind}"
        for projection in ("gate_proj", "up_proj", "down_proj")
        for kind in ("weight", "bias")
    ]
    try:
        compiled = [re.compile(pattern) for pattern in converter_patterns(transform, "source_patterns")]
    except re.error:  # not a regex as written: transformers rewrites it, this cannot tell
        return False
    return any(pattern.search(sample) for pattern in compiled for sample in samples)


def leaving_per_expert_keys(transform: WeightConverter) -> WeightConverter:
    """``transform`` (a plain stock converter) made to leave defused per-expert keys alone;
    ``transform`` itself when it is of a class of its own (which this cannot rebuild)."""
    if type(transform) is not WeightConverter:
        logger.warning("%r may take defused per-expert keys and is kept as it is", transform)
        return transform
    leaving = _LeavesPerExpertKeys(
        source_patterns=converter_patterns(transform, "source_patterns"),
        target_patterns=converter_patterns(transform, "target_patterns"),
        operations=list(transform.operations),
    )
    for name in ("scope_prefix", "base_model_prefix"):
        if getattr(transform, name, None) is not None:
            setattr(leaving, name, getattr(transform, name))
    return leaving


class PerExpertRenaming(WeightRenaming):
    """Renames one projection of every expert from a checkpoint's name to defuser's on load;
    its reverse goes back on save.  It is kept for saving whether or not a load used it.

    Written the way transformers' own mappings are: regexes whose match is replaced by a
    plain target.  The expert index stays in the key because only the projection's part is
    matched, behind a lookbehind for ``{before}<index>`` (one branch per index width, since a
    lookbehind has a fixed width): no back-reference in any pattern, so tools that reverse the
    mapping and read targets as regexes (auto-round) can."""

    @classmethod
    def between(cls, before: str, checkpoint_after: str, defused_after: str) -> PerExpertRenaming:
        """Rename ``{before}<index>{checkpoint_after}`` to ``{before}<index>{defused_after}``."""
        renaming = cls(source_patterns=_behind_index(before, checkpoint_after), target_patterns=defused_after)
        object.__setattr__(renaming, "_defuser_pieces", (before, checkpoint_after, defused_after))
        return renaming

    def reverse_transform(self) -> WeightRenaming:
        pieces = self.__dict__.get("_defuser_pieces")
        if pieces is None:  # a copy transformers made from the patterns alone
            return super().reverse_transform()
        before, checkpoint_after, defused_after = pieces
        reverse = PerExpertRenaming.between(before, defused_after, checkpoint_after)
        for name in ("scope_prefix", "base_model_prefix"):
            if hasattr(self, name):
                setattr(reverse, name, getattr(self, name))
        return reverse

    def was_used(self) -> bool:
        return True


# Expert indices up to this many digits are renamed (a million experts per module).
_INDEX_DIGITS = 6


def _behind_index(before: str, after: str) -> list[str]:
    """Patterns matching ``after`` where ``before`` and an expert index precede it, written with
    character classes rather than backslash escapes: tools that reverse the mapping also read
    patterns as replacement templates (auto-round), where ``\\d`` is an error."""
    return [rf"(?<={_literal(before)}[0-9]{{{width}}}){_literal(after)}" for width in range(1, _INDEX_DIGITS + 1)]


def _literal(text: str) -> str:
    """A regex matching ``text`` exactly: dots as ``[.]``, other specials escaped."""
    return "".join("[.]" if char == "." else re.escape(char) for char in text)


def unescape_pattern(pattern: str) -> str:
    """A converter's regex ``pattern`` as the plain key text it matches (escapes and anchors removed)."""
    return re.sub(r"\\(.)", r"\1", pattern).removeprefix("^").removesuffix("$")


def _renaming(checkpoint_key: str, defused_key: str) -> PerExpertRenaming:
    """A renaming from ``{prefix}{i}.{checkpoint projection}`` to ``{prefix}{i}.{defused
    projection}``; both arguments hold ``\x00`` where the expert index goes."""
    before, after = checkpoint_key.split("\x00")
    ours_before, ours_after = defused_key.split("\x00")
    if before != ours_before:
        raise ValueError(f"a per-expert renaming keeps the part before the index: {before!r} != {ours_before!r}")
    return PerExpertRenaming.between(before, after, ours_after)


def expert_projection_renames(names: dict[str, str]) -> list[WeightRenaming]:
    """Renamings from legacy per-expert projection names (``w1``) to defused ones
    (``gate_proj``), reversed on save so checkpoints keep the legacy names stock loads."""
    return [_renaming(f".experts.\x00.{legacy}.", f".experts.\x00.{current}.") for legacy, current in names.items()]


def _operations(transform: Any) -> list[Any]:
    return list(getattr(transform, "operations", None) or [])


def fuses_expert_keys(transform: Any) -> bool:
    """True for a stock converter that merges per-expert checkpoint keys into a fused experts tensor."""
    operations = _operations(transform)
    return (
        isinstance(transform, WeightConverter)
        and bool(operations)
        and type(operations[0]).__name__ == "MergeModulelist"
        and all("*" in source for source in converter_patterns(transform, "source_patterns"))
    )


def fuses_dense_halves(transform: Any) -> bool:
    """True for a stock converter that concatenates separate gate and up Linear weights of a
    dense MLP into its ``gate_up_proj``."""
    targets = [unescape_pattern(target) for target in converter_patterns(transform, "target_patterns")]
    return (
        isinstance(transform, WeightConverter)
        and [type(op).__name__ for op in _operations(transform)] == ["Concatenate"]
        and len(targets) == 1
        and targets[0].endswith("gate_up_proj.weight")
    )


def per_expert_renames(transform: Any) -> list[PerExpertRenaming]:
    """Renamings between the per-expert keys a stock merging converter reads and defuser's own
    (``gate_proj``, ``up_proj``, ``down_proj``), scoped like ``transform``; empty when the names
    already agree or the converter does more than stack and concatenate."""
    if not fuses_expert_keys(transform):
        return []
    operations = [type(op).__name__ for op in _operations(transform)]
    sources = [unescape_pattern(source) for source in converter_patterns(transform, "source_patterns")]
    targets = [unescape_pattern(target) for target in converter_patterns(transform, "target_patterns")]
    if len(targets) != 1:
        return []
    stem, _, fused = targets[0].rpartition(".")
    if len(sources) == 2 and operations == ["MergeModulelist", "Concatenate"] and fused == "gate_up_proj":
        projections = ("gate_proj", "up_proj")
    elif len(sources) == 1 and operations == ["MergeModulelist"] and fused in ("up_proj", "down_proj"):
        projections = (fused,)
    else:
        return []
    renames = []
    for source, projection in zip(sources, projections, strict=True):
        before, _, after = source.partition("*")
        if before.rstrip(".") != stem.rstrip(".") or not after.startswith("."):
            return []  # the merged keys live elsewhere than the fused tensor: not a plain rename
        kind = after.rsplit(".", 1)[-1]
        ours = f".{projection}.{kind}"
        if after == ours:
            continue
        rename = _renaming(f"{before}\x00{after}", f"{before}\x00{ours}")
        for name in ("scope_prefix", "base_model_prefix"):
            if getattr(transform, name, None) is not None:
                setattr(rename, name, getattr(transform, name))
        renames.append(rename)
    return renames


def stock_save_conversions(model: nn.Module) -> list[Any] | None:
    """Transformers' stock checkpoint conversions of ``model`` (None: not a pretrained model, or
    one transformers cannot map).  Read before a conversion, it walks the fused model's few
    modules rather than the defused model's tens of thousands; a conversion changes no
    pretrained sub-model, which is what the stock mapping is read from."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping

    if not isinstance(model, PreTrainedModel):
        return None
    try:
        return list(get_model_conversion_mapping(model, add_legacy=False))
    except Exception as error:  # a model transformers cannot map: saving keeps defuser's names
        logger.warning("no save mapping for %s: %s", type(model).__name__, error)
        return None


def attach_save_mapping(model: nn.Module, stock: list[Any] | None = None) -> bool:
    """Make ``model.save_pretrained`` write a converted model so plain transformers loads it:
    per-expert keys under the names its stock checkpoint mapping merges on load (Mixtral:
    ``block_sparse_moe.experts.N.w1``), every other defused module in its fused layout (see
    :mod:`defuser.engine.save`), out of reach of stock converters whose reverse would fold
    defused keys into a fused tensor the model no longer has.  ``stock`` is
    :func:`stock_save_conversions` read before the conversion (read now when None).  Returns
    True when the model's save mapping changed."""
    from transformers import PreTrainedModel

    from defuser.engine.save import fused_on_save_converter, is_fused_on_save

    if not isinstance(model, PreTrainedModel):
        return False
    if stock is None:
        stock = stock_save_conversions(model)
        if stock is None:
            return False
    try:
        renames = [rename for transform in stock for rename in per_expert_renames(transform)]
        current = getattr(model, "_weight_conversions", None)
        # transformers drops prefix changes for a model from_pretrained did not build (it
        # cannot know whether they applied), and so does this.
        conversions = list(current) if current is not None else [c for c in stock if type(c).__name__ != "PrefixChange"]
    except Exception as error:  # a model transformers cannot map: saving keeps defuser's names
        logger.warning("no save mapping for %s: %s", type(model).__name__, error)
        return False
    defused, kinds = _defused_keys(model)
    if not kinds:
        return False
    kept = [
        conversion
        for conversion in conversions
        if not _folds_defused_keys(conversion, defused) and not is_fused_on_save(conversion)
    ]
    known = {_signature(conversion) for conversion in kept}
    added: list[Any] = [rename for rename in renames if _signature(rename) not in known]
    # Last in the list: transformers reverses the list on save, so it takes its keys first; it
    # then applies the model's own converters (those left out above included) to what it wrote.
    originals = [conversion for conversion in conversions if not is_fused_on_save(conversion)]
    added.append(
        fused_on_save_converter(
            originals, experts="experts" in kinds, dense="dense" in kinds, parallel="parallel" in kinds
        )
    )
    model._weight_conversions = kept + added
    logger.debug(
        "save mapping of %s: %d per-expert renaming(s), fused on save: %s, %d converter(s) left out",
        type(model).__name__,
        len(added) - 1,
        sorted(kinds),
        len(conversions) - len(kept),
    )
    return True


def _defused_keys(model: nn.Module) -> tuple[list[str], set[str]]:
    """State-dict keys standing for the defused modules of ``model`` (experts and split dense
    MLPs), and which kinds of defused modules it holds ("experts", "parallel", "dense"), in
    one walk.  Converter patterns match any expert index, so expert 0's keys stand for every
    expert: a full state-dict walk would cost more than the zero-copy conversion itself."""
    from defuser.engine.kinds import defused_kind

    kinds: set[str] = set()
    keys: dict[str, str] = {}  # key with layer numbers as 0 -> the first real key of that form

    pending = [("", model)]
    while pending:
        path, module = pending.pop()
        prefix = f"{path}." if path else ""
        kind = defused_kind(module)
        if kind is not None:
            kinds.add(kind.name)
            for key in kind.defused_keys(module, prefix):
                # Layers of one kind give the same answer; converter patterns tell kinds apart by name.
                keys.setdefault(_ANY_INDEX.sub(".0.", key), key)
            if kind.replaces_module:
                continue  # nothing defused inside the experts
        children = reversed(module._modules.items())
        pending += [(f"{prefix}{name}", child) for name, child in children if child is not None]
    return list(keys.values()), kinds


_ANY_INDEX = re.compile(r"\.\d+\.")


def _folds_defused_keys(conversion: Any, keys: list[str]) -> bool:
    """True for a converter whose reverse (on save) would take defused per-expert keys into a
    fused tensor (Inkling's shared experts: ``gate_proj`` + ``up_proj`` -> ``shared_w13_weight``)."""
    if not isinstance(conversion, WeightConverter) or not keys:
        return False
    try:
        reverse = conversion.reverse_transform()
    except Exception:  # not reversible (quantized): transformers refuses to save it anyway
        return False
    return any(reverse.rename_source_key(key)[1] is not None for key in keys)


def _signature(transform: Any) -> tuple[Any, ...]:
    return (
        type(transform).__name__,
        tuple(converter_patterns(transform, "source_patterns")),
        tuple(converter_patterns(transform, "target_patterns")),
        getattr(transform, "scope_prefix", None),
    )
