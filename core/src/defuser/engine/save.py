"""Saving a defused model as stock transformers saves the fused model.

``save_pretrained`` reverses the weight conversions a model carries (``model._weight_conversions``,
or the checkpoint mapping of its type) before it writes: each reversed converter receives the
state-dict tensors its source patterns match, grouped by the key the match is renamed to.
:func:`fused_on_save_converter` is one such converter, placed so that it takes its keys first.
Its reverse takes the per-expert keys of defused modules (``experts.N.gate_proj.weight``,
``experts.N.linear.weight``) and the ``gate_proj``/``up_proj`` halves of split dense MLPs, one
decoder layer per group, finds the module each key belongs to and writes:

- the per-expert keys as they are, where the stock checkpoint mapping merges per-expert keys
  into that fused tensor on load (Mixtral: renamings elsewhere in the mapping give them the
  stock names; identity experts get the zero keys stock checkpoints hold for them);
- otherwise the fused tensors, in the exact layout of the fused module (transposed,
  interleaved, flattened, padded with identity experts), read from the module's own layout;

then hands what it wrote (and the other keys of the layer it took) to the model's stock
converters, reversed, as transformers does for the fused model.  The result is the checkpoint
stock transformers writes for the fused model, which it loads with defuser never imported.

Memory: a fused tensor is a view of the per-expert storage where the experts still lie as the
fused tensor did (a zero-copy defusion), or a transposed view of one stacked copy that
transformers' writer makes contiguous one tensor at a time; interleaved or separately stored
halves are joined into a new tensor, held (as transformers holds every tensor its reversal
produces) until the write: one copy of those experts' weights, never a copy of the model.

Projections that are no longer plain ``nn.Linear`` (a quantizer replaced them) keep their
per-expert keys, and one warning names the loader they need (``replace_fused_blocks``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter

from defuser.engine.candidates import DenseLayout, ExpertsLayout, ParallelLayout
from defuser.engine.layout import join_gate_up, orient

__all__ = ["FusedOnSave", "fused_on_save_converter", "is_fused_on_save", "stock_merged_names"]

logger = logging.getLogger(__name__)

# The key the matched tensors of one layer are grouped under (the match replaced by this);
# it names no tensor of any model.
_GROUP = ".defuser_fused_on_save"
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Each pattern starts its match at the first index of the key (a decoder layer): every defused
# module of one layer falls in one group, so the stock conversions that read several of them
# (ERNIE-VL's text and vision experts into one checkpoint tensor) see them together.
# Written with character classes, not backslash escapes: tools that reverse the mapping read
# these patterns as replacement templates too (auto-round), where ``\\d`` is an error.
_LAYER = r"(?:[.][0-9]+(?:[.][^.]+)+?)?"
_EXPERT_TAILS = tuple(
    rf"[.][0-9]+[.]{projection}[.]{part}" for projection in _PROJECTIONS for part in ("weight", "bias")
)
_PARALLEL_TAILS = (r"[.][0-9]+[.]linear[.]weight",)
_DENSE_TAILS = tuple(rf"[.]{half}[.]{part}" for half in ("gate_proj", "up_proj") for part in ("weight", "bias"))
_KEY = re.compile(
    r"(?P<path>.+?)(?:\.(?P<index>\d+))?\.(?P<projection>gate_proj|up_proj|down_proj|linear)\.(?P<part>weight|bias)"
)

# (model class, projection class) pairs already warned about: a quantized model warns once.
_warned: set[tuple[str, str]] = set()


class FusedOnSave(ConversionOps):
    """The operation of :func:`fused_on_save_converter` (its converter does the work, as it
    needs each tensor's key); applied on save only."""

    def __init__(self, direction: str = "load"):
        self.direction = direction

    def __repr__(self) -> str:
        return f"FusedOnSave({self.direction!r})"

    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
    ):
        raise NotImplementedError("FusedOnSave is applied by its converter on save only")

    @property
    def reverse_op(self) -> ConversionOps:
        return FusedOnSave("save" if self.direction == "load" else "load")


class _SaveState:
    """What the converter and its reverse share: which fused names stock merges from per-expert
    keys, the stock converters applied after fusing, the key patterns.  Shared, not copied, by
    the copies transformers makes of the reverse for each group of keys."""

    def __init__(self, patterns: tuple[str, ...], merged: frozenset[str], merged_dense: frozenset[str], stock: list):
        self.patterns = patterns
        self.merged = merged
        self.merged_dense = merged_dense
        self.stock = stock
        self.reverses: list[WeightConverter] | None = None
        self.matcher = re.compile("|".join(f"(?:{pattern})(?!\\w)" for pattern in patterns))

    def __deepcopy__(self, memo: dict) -> _SaveState:
        return self

    def stock_reverses(self) -> list[WeightConverter]:
        """The reverses of the stock converters (computed on the first save)."""
        if self.reverses is None:
            reverses = []
            # transformers matches the reverses in the reverse order of the mapping.
            for converter in reversed(self.stock):
                try:
                    reverses.append(converter.reverse_transform())
                except Exception as error:  # not reversible: transformers cannot save through it either
                    logger.debug("stock converter %r has no reverse: %s", converter, error)
            self.reverses = reverses
        return self.reverses


class _FusedOnSaveConverter(WeightConverter):
    """See :func:`fused_on_save_converter`.  Load direction: matches no checkpoint key."""

    def was_used(self) -> bool:
        # from_pretrained keeps in the model's mapping only the transforms a load used; this
        # one matches no checkpoint key and is there for the save.
        return True

    def reverse_transform(self) -> WeightConverter:
        state: _SaveState = self.__dict__["_defuser_save"]
        reverse = _FusingConverter(
            source_patterns=list(state.patterns), target_patterns=_GROUP, operations=[FusedOnSave("save")]
        )
        reverse.__dict__["_defuser_save"] = state
        for name in ("scope_prefix", "base_model_prefix"):
            if getattr(self, name, None) is not None:
                setattr(reverse, name, getattr(self, name))
        return reverse


class _FusingConverter(WeightConverter):
    """The reverse of :class:`_FusedOnSaveConverter`: one copy per group of matched keys."""

    def add_tensor(self, target_key: str, source_key: str, source_pattern: str, future: Any) -> None:
        self.__dict__.setdefault("_defuser_tensors", []).append((source_key, future))

    def reverse_transform(self) -> WeightConverter:
        raise NotImplementedError("the reverse of a save-only conversion")

    def convert(self, layer_name: str, model: nn.Module | None = None, config: Any = None, **kwargs: Any):
        tensors = self.__dict__.pop("_defuser_tensors", [])
        # ``layer_name`` is the key up to the match, renamed as transformers renamed it so far,
        # followed by the group name: written keys keep that prefix and their own tail.
        renamed_prefix = layer_name.removesuffix(_GROUP)
        state: _SaveState = self.__dict__["_defuser_save"]
        written = _save_form(model, tensors, renamed_prefix, state)
        return _through_stock(written, state.stock_reverses(), model)


def stock_merged_names(stock: Iterable[Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The fused experts tensor names (``gate_up_proj``, ``down_proj``) and dense fused names
    into which stock converters of ``stock`` merge per-expert (or per-half) checkpoint keys."""
    from defuser.engine.checkpoint import fuses_dense_halves, fuses_expert_keys

    experts: set[str] = set()
    dense: set[str] = set()
    for transform in stock:
        targets = getattr(transform, "_original_target_patterns", None) or getattr(transform, "target_patterns", [])
        targets = [targets] if isinstance(targets, str) else list(targets)
        plain = [re.sub(r"\\(.)", r"\1", target).removeprefix("^").removesuffix("$") for target in targets]
        if fuses_expert_keys(transform):
            experts.update(target.rpartition(".")[2] for target in plain)
        elif fuses_dense_halves(transform):
            dense.update(target.removesuffix(".weight").rpartition(".")[2] for target in plain)
    return frozenset(experts), frozenset(dense)


def fused_on_save_converter(
    stock: Iterable[Any] = (),
    experts: bool = True,
    dense: bool = True,
    parallel: bool = True,
) -> WeightConverter:
    """A converter whose reverse (applied by ``save_pretrained``) writes defused modules the way
    stock transformers saves the fused model: per-expert keys where a stock converter of
    ``stock`` (the type's stock checkpoint mapping) merges them on load, each other defused
    module in its fused layout; then ``stock``'s converters are reversed on what it wrote, as
    transformers reverses them on a fused model.  ``experts``, ``dense`` and ``parallel``
    choose which keys it takes (a model without split dense MLPs leaves every ``gate_proj`` key
    to the other converters)."""
    tails = [
        *(_EXPERT_TAILS if experts else ()),
        *(_PARALLEL_TAILS if parallel else ()),
        *(_DENSE_TAILS if dense else ()),
    ]
    stock = [transform for transform in stock if isinstance(transform, WeightConverter) and not _is_ours(transform)]
    merged, merged_dense = stock_merged_names(stock)
    patterns = tuple(_LAYER + tail for tail in tails) or ("(?!)defuser-never",)
    # The load direction matches no checkpoint key; its targets name what the reverse reads.
    converter = _FusedOnSaveConverter(
        source_patterns=_GROUP, target_patterns=tails or [".defuser_nothing"], operations=[FusedOnSave("load")]
    )
    converter.__dict__["_defuser_save"] = _SaveState(patterns, merged, merged_dense, stock)
    return converter


def _is_ours(transform: Any) -> bool:
    return "_defuser_save" in getattr(transform, "__dict__", {}) or type(transform).__name__ == "_LoadOnlyConverter"


def is_fused_on_save(transform: Any) -> bool:
    """True for a converter made by :func:`fused_on_save_converter`."""
    return "_defuser_save" in getattr(transform, "__dict__", {})


# --- the save form of one group of keys ----------------------------------------------------


def _save_form(
    model: nn.Module | None, tensors: list[tuple[str, torch.Tensor]], renamed_prefix: str, state: _SaveState
) -> dict[str, torch.Tensor]:
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors:
        match = _KEY.fullmatch(key)
        path = match["path"] if match else ""
        by_module.setdefault(path, []).append((key, tensor))
    result: dict[str, torch.Tensor] = {}
    for path, items in by_module.items():
        start = _match_start(state, items[0][0])
        module = _module_at(model, path)
        fused = _fused_form(model, path, module, items, state) if module is not None else None
        if fused is None:  # written as they are
            for key, tensor in items:
                result[_written_key(renamed_prefix, key, _match_start(state, key))] = tensor
            continue
        for name, tensor in fused.items():
            result[_written_key(renamed_prefix, f"{path}.{name}", start)] = tensor
    return result


def _match_start(state: _SaveState, key: str) -> int | None:
    match = state.matcher.search(key)
    return None if match is None else match.start()


def _written_key(renamed_prefix: str, key: str, start: int | None) -> str:
    """``key`` with the part before the match replaced by the prefix transformers renamed it to."""
    return key if start is None else renamed_prefix + key[start:]


def _through_stock(
    written: dict[str, torch.Tensor], reverses: list[WeightConverter], model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """``written`` after the stock reverse converters, applied as transformers applies them on
    save: at most one per key, keys renamed to the same name converted together."""
    from copy import deepcopy

    from transformers.core_model_loading import dot_natural_key

    result: dict[str, torch.Tensor] = {}
    groups: dict[str, WeightConverter] = {}
    for key in sorted(written, key=dot_natural_key):
        for reverse in reverses:
            renamed, pattern = reverse.rename_source_key(key)
            if pattern is not None:
                group = groups.get(renamed)
                if group is None:
                    group = groups[renamed] = deepcopy(reverse)
                group.add_tensor(renamed, key, pattern, written[key])
                break
        else:
            result[key] = written[key]
    config = getattr(model, "config", None)
    seen = _WithFusedTensors(model, written) if model is not None else None
    for renamed, group in groups.items():
        for name, value in group.convert(renamed, model=seen, config=config).items():
            result[name] = value[0] if isinstance(value, list) else value
    return result


class _WithFusedTensors:
    """``model`` as a stock reverse converter reads it: a transpose that compares the tensor with
    the model's parameter (``Transpose(check_dims=True)``) finds the fused tensor just written,
    which the defused model no longer holds."""

    def __init__(self, model: nn.Module, written: dict[str, torch.Tensor]):
        self._model = model
        self._written = written

    def get_parameter(self, target: str) -> torch.Tensor:
        tensor = self._written.get(target)
        return tensor if tensor is not None else self._model.get_parameter(target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _module_at(model: nn.Module | None, path: str) -> nn.Module | None:
    if model is None or not path:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _fused_form(
    model: nn.Module | None, path: str, module: nn.Module, items: list[tuple[str, torch.Tensor]], state: _SaveState
) -> dict[str, torch.Tensor] | None:
    """``{fused tensor name: tensor}`` for ``module`` (relative to ``path``), or None when its
    keys are written per expert."""
    from defuser.engine.dense import split_dense_layout
    from defuser.engine.experts import DefusedExperts
    from defuser.engine.parallel import DefusedParallelExperts

    if isinstance(module, DefusedExperts):
        layout: ExpertsLayout = module.layout
        names = _fused_names(layout)
        if {name.rpartition(".")[2] for name in names if not name.endswith("_bias")} <= state.merged:
            # The stock mapping merges the per-expert keys on load: written per expert, with the
            # identity experts' zero rows the stock fused tensor holds past the routed ones.
            items.extend(_identity_expert_keys(module, layout, path, items))
            return None
        if not _plain_linears(
            model, path, [getattr(e, p, None) for e in module for p in _PROJECTIONS if hasattr(e, p)]
        ):
            return None
        return _fused_experts(module, layout, path, items)
    if isinstance(module, DefusedParallelExperts):
        if not _plain_linears(model, path, [getattr(expert, "linear", None) for expert in module]):
            return None
        return _fused_parallel(module, module.layout, path, items)
    dense_layout = split_dense_layout(module)
    if dense_layout is not None:
        if dense_layout.fused_name in state.merged_dense:
            return None
        if not _plain_linears(model, path, [module._modules.get("gate_proj"), module._modules.get("up_proj")]):
            return None
        return _fused_dense(dense_layout, path, items)
    return None


def _identity_expert_keys(
    module: nn.Module, layout: ExpertsLayout, path: str, items: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """Zero per-expert tensors for the identity experts a fused tensor holds rows for past the
    routed experts (LongCat-Flash before 5.25.0): stock checkpoints have keys for them, the
    defused module does not (their rows are never read; ``fuse_model`` zeroes them too)."""
    shapes = module.__dict__.get("_fused_tensor_shapes") or {}
    if not layout.identity_experts or layout.flattened:
        return []
    padding = []
    for key, tensor in items:
        match = _KEY.fullmatch(key)
        if match is None or match["index"] != "0":
            continue
        projection, part = match["projection"], match["part"]
        shape = shapes.get(_fused_name_of(layout, projection) + ("_bias" if part == "bias" else ""))
        for index in range(layout.num_experts, shape[0] if shape else 0):
            padding.append((f"{path}.{index}.{projection}.{part}", torch.zeros_like(tensor)))
    return padding


def _fused_name_of(layout: ExpertsLayout, projection: str) -> str:
    """The fused tensor ``projection`` of every expert is read from."""
    if projection == "down_proj":
        return layout.down_name
    if layout.separate_gate_up:
        return layout.gate_name if projection == "gate_proj" else layout.up_name
    return layout.first_name


def _plain_linears(model: nn.Module | None, path: str, projections: list[Any]) -> bool:
    """True when every projection is a plain ``nn.Linear``; else warns once that the per-expert
    keys are written, which only a defused model loads."""
    odd = next((p for p in projections if type(p) is not nn.Linear), None)
    if odd is None:
        return True
    where = (type(model).__name__, type(odd).__name__)
    if where not in _warned:
        _warned.add(where)
        logger.warning(
            "%s: projections of defused modules (%s first) are %s, not plain nn.Linear: saved per expert; "
            "load the checkpoint into a model built after defuser.replace_fused_blocks(model_type), or with "
            "the quantizer's own loader",
            type(model).__name__,
            path,
            type(odd).__name__,
        )
    return False


def _fused_names(layout: ExpertsLayout) -> list[str]:
    from defuser.engine.fuse import fused_names

    return fused_names(layout)


def _per_expert(
    items: list[tuple[str, torch.Tensor]], path: str, count: int
) -> dict[tuple[str, str], list[torch.Tensor]] | None:
    """``{(projection, part): [tensor of expert 0, 1, ...]}``, or None when the keys are not
    exactly experts ``0 .. count - 1`` of each projection (experts held by other ranks)."""
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in items:
        match = _KEY.fullmatch(key)
        if match is None or match["index"] is None:
            return None
        if not _plain_tensor(tensor):
            logger.warning(
                "%s: %s is a %s %s, not a plain float tensor: saved per expert",
                path,
                key,
                type(tensor).__name__,
                tensor.dtype,
            )
            return None
        found.setdefault((match["projection"], match["part"]), {})[int(match["index"])] = tensor
    result = {}
    for name, tensors in found.items():
        if sorted(tensors) != list(range(count)):
            # Experts held by other ranks, or an offloaded save whose shard ends inside the module.
            logger.warning(
                "%s: the state dict handed over holds experts %s of %s, not 0..%d: saved per expert, which only a "
                "model built after replace_fused_blocks loads",
                path,
                sorted(tensors)[:4],
                ".".join(name),
                count - 1,
            )
            return None
        result[name] = [tensors[index] for index in range(count)]
    return result


def _plain_tensor(tensor: torch.Tensor) -> bool:
    """True for a plain floating tensor (a quantizer's packed or wrapped weight is neither)."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.dtype.is_floating_point


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, as a view when they lie evenly spaced in one storage."""
    first = tensors[0]
    if len(tensors) > 1 and first.device.type != "meta":
        step = tensors[1].storage_offset() - first.storage_offset()
        same = all(
            t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and t.shape == first.shape
            and t.stride() == first.stride()
            and t.dtype == first.dtype
            and t.storage_offset() == first.storage_offset() + index * step
            for index, t in enumerate(tensors)
        )
        if same and step > 0:
            return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(tensors)


def _joined(gate: torch.Tensor, up: torch.Tensor, layout: ExpertsLayout, dim: int) -> torch.Tensor:
    """The fused gate-up rows from the stacked halves: a view when the halves are the two
    halves of one concatenated tensor, else :func:`join_gate_up` (a copy)."""
    first, second = (gate, up) if layout.gate_first else (up, gate)
    dim = dim % first.ndim
    if (
        layout.is_concatenated
        and first.device.type != "meta"
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.shape == second.shape
        and first.stride() == second.stride()
        and second.storage_offset() == first.storage_offset() + first.shape[dim] * first.stride(dim)
    ):
        shape = list(first.shape)
        shape[dim] *= 2
        return first.as_strided(shape, first.stride(), first.storage_offset())
    return join_gate_up(gate, up, layout, dim=dim)


def _pad(tensor: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Zero rows appended for the identity experts the defused form does not hold."""
    if shape is None or tensor.shape[0] >= shape[0]:
        return tensor
    return torch.cat((tensor, tensor.new_zeros((shape[0] - tensor.shape[0], *tensor.shape[1:]))))


def _fused_experts(
    module: nn.Module, layout: ExpertsLayout, path: str, items: list[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    shapes = {name: tuple(shape) for name, shape in (module.__dict__.get("_fused_tensor_shapes") or {}).items()}
    sharded = module.__dict__.get("_defuser_sharded")
    if sharded is not None and getattr(sharded, "shapes", None):
        # Sharded over ranks: the state dict was gathered whole, the fused shapes recorded whole.
        shapes = {name: tuple(shape) for name, shape in sharded.shapes.items()}
        rows = [shape[0] for name, shape in shapes.items() if shape and not name.endswith("_bias")]
        if getattr(sharded, "kind", None) == "expert" and not layout.flattened and rows:
            # Routed experts: the fewest rows (identity experts add rows to some tensors only).
            layout = dataclasses.replace(layout, num_experts=min(rows))
    stacks = _per_expert(items, path, layout.num_experts)
    if stacks is None:
        return None

    def stack(projection: str, part: str) -> torch.Tensor | None:
        tensors = stacks.get((projection, part))
        return None if tensors is None else _stacked(tensors)

    def stored(weight: torch.Tensor, transposed: bool, name: str) -> torch.Tensor:
        tensor = orient(weight, transposed)
        if layout.flattened:
            return tensor.reshape(-1, tensor.shape[-1])
        return _pad(tensor, shapes.get(name))

    up, down = stack("up_proj", "weight"), stack("down_proj", "weight")
    if up is None or down is None:
        raise ValueError(f"{path}: the state dict holds no up_proj/down_proj weights of its experts")
    result = {layout.down_name: stored(down, layout.transposed_down, layout.down_name)}
    if (down_bias := stack("down_proj", "bias")) is not None:
        result[f"{layout.down_name}_bias"] = _pad(down_bias, shapes.get(f"{layout.down_name}_bias"))
    up_bias = stack("up_proj", "bias")
    if not layout.has_gate:
        result[layout.first_name] = stored(up, layout.is_transposed, layout.first_name)
        if up_bias is not None:
            result[f"{layout.first_name}_bias"] = _pad(up_bias, shapes.get(f"{layout.first_name}_bias"))
    else:
        gate, gate_bias = stack("gate_proj", "weight"), stack("gate_proj", "bias")
        if gate is None:
            raise ValueError(f"{path}: the state dict holds no gate_proj weights of its gated experts")
        if layout.separate_gate_up:
            result[layout.gate_name] = stored(gate, layout.is_transposed, layout.gate_name)
            result[layout.up_name] = stored(up, layout.is_transposed, layout.up_name)
        else:
            result[layout.first_name] = stored(_joined(gate, up, layout, -2), layout.is_transposed, layout.first_name)
            if gate_bias is not None and up_bias is not None:
                joined = _joined(gate_bias, up_bias, layout, -1)
                result[f"{layout.first_name}_bias"] = _pad(joined, shapes.get(f"{layout.first_name}_bias"))
    for name, tensor in result.items():
        expected = shapes.get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise ValueError(f"{path}: rebuilt {name} has shape {tuple(tensor.shape)}, the fused module had {expected}")
    return result


def _fused_parallel(
    module: nn.Module, layout: ParallelLayout, path: str, items: list[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    stacks = _per_expert(items, path, len(module))
    if stacks is None or set(stacks) != {("linear", "weight")}:
        return None
    return {layout.weight_name: orient(_stacked(stacks[("linear", "weight")]), layout.transposed)}


def _fused_dense(
    layout: DenseLayout, path: str, items: list[tuple[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    from defuser.engine.fuse import adjacent_or_cat

    halves: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in items:
        match = _KEY.fullmatch(key)
        if match is None or match["index"] is not None:
            raise ValueError(f"{path}: {key!r} is not a half of its split dense MLP")
        if not _plain_tensor(tensor):
            logger.warning(
                "%s: %s is a %s %s, not a plain float tensor: saved as it is",
                path,
                key,
                type(tensor).__name__,
                tensor.dtype,
            )
            return None
        halves[(match["projection"], match["part"])] = tensor
    result = {}
    for part in ("weight", "bias"):
        gate, up = halves.get(("gate_proj", part)), halves.get(("up_proj", part))
        if gate is None and up is None:
            continue
        if gate is None or up is None:
            raise ValueError(f"{path}: only one of gate_proj.{part} and up_proj.{part} is in the state dict")
        first, second = (gate, up) if layout.gate_first else (up, gate)
        result[f"{layout.fused_name}.{part}"] = adjacent_or_cat(first, second)
    return result
