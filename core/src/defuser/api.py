"""The public entry points: ``convert_model``, ``fuse_model``, ``replace_fused_blocks`` and its undo."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from torch import nn
from tqdm.auto import tqdm

from defuser.compat import transformers_supported
from defuser.engine.candidates import Candidate
from defuser.engine.detect import iter_typed_modules, layer_index, parents_of, root_model_type
from defuser.engine.experts import register_experts_implementation
from defuser.engine.offload import dispatched_conversion
from defuser.engine.preload import apply_preload_plan, is_patched, restore_preload_patches
from defuser.engine.transaction import releasing_consumed, snapshot_module
from defuser.filtering import compile_filter
from defuser.modeling.replace_modules import remember_original
from defuser.plugins import DefuserPluginManager, get_plugin_manager

__all__ = [
    "ConversionError",
    "convert_model",
    "defused_blocks",
    "find_candidates",
    "fuse_model",
    "replace_fused_blocks",
    "restore_fused_blocks",
]

logger = logging.getLogger(__name__)

# The fused tensors a defused experts module no longer needs (dropped by cleanup_original).
_FUSED_TENSOR_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


class ConversionError(RuntimeError):
    """Defusing one module failed; that module was left as it was."""


def _check_max_layers(max_layers: object) -> int | None:
    if max_layers is None:
        return None
    if isinstance(max_layers, bool) or not isinstance(max_layers, int):
        raise TypeError(f"max_layers must be a positive int or None, got {type(max_layers).__name__}: {max_layers!r}")
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    return max_layers


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every fused block of ``model`` that an installed plugin (or the generic engine) can defuse."""
    manager = get_plugin_manager()
    found = []
    for path, module, model_type in iter_typed_modules(model):
        candidate = manager.detect(module, path, model_type)
        if candidate is not None:
            if candidate.generic and manager.owner_of(model_type) is None:
                logger.info("%s (%s, model type %s) handled generically", path, candidate.class_name, model_type)
            found.append(candidate)
    return found


def _install(model: nn.Module, old: nn.Module, replacement: nn.Module) -> None:
    """Put ``replacement`` wherever ``old`` sits in ``model``; when ``old`` is ``model`` itself
    (a bare experts module converted on its own), ``model`` becomes ``replacement`` in place."""
    if replacement is old:
        return
    if old is model:
        _become(model, replacement)
        return
    for parent, name in parents_of(model, old):
        parent._modules[name] = replacement


def _become(target: nn.Module, source: nn.Module) -> None:
    """Make the object ``target`` the module ``source`` (class and state), so a caller's
    reference to the root sees the replacement; ``source`` is not used afterwards."""
    state = dict(source.__dict__)
    target.__dict__.clear()
    target.__dict__.update(state)
    target.__class__ = type(source)


def _drop_fused_tensors(module: nn.Module) -> None:
    for name in _FUSED_TENSOR_NAMES:
        if isinstance(module._parameters.get(name), nn.Parameter):
            module._parameters[name] = None


def convert_model(
    model: nn.Module,
    cleanup_original: bool = False,
    max_layers: int | None = None,
    filter: Sequence[str] | None = None,  # noqa: A002 - the public name users already call
) -> bool:
    """Defuse the fused MoE experts and fused dense MLPs of a loaded model, in place.

    Each fused experts module becomes numbered experts holding ``gate_proj``/``up_proj``/
    ``down_proj`` ``nn.Linear`` modules (views of the fused storage where the layout allows);
    each dense ``gate_up_proj`` becomes ``gate_proj`` + ``up_proj``.  Outputs are unchanged.
    Works on meta-device models.  ``max_layers=N`` converts decoder layers ``0..N-1`` only;
    ``filter`` is a list of PCRE rules on module paths (``+:re`` include, ``-:re`` exclude,
    bare ``re`` include; exclusion wins).  ``cleanup_original=True`` also drops the fused
    tensors from the replaced modules so their memory can be freed where nothing else holds
    them.  Returns True when something was defused; False (model untouched) for a model with
    nothing to defuse, an unsupported model type, or transformers older than 5.3.0.  A module
    whose defusion fails is left as it was and :class:`ConversionError` names its path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    limit = _check_max_layers(max_layers)
    rules = compile_filter(filter)
    if not transformers_supported("convert_model"):
        return False
    register_experts_implementation()
    selected = []
    for candidate in find_candidates(model):
        index = layer_index(candidate.path)
        if limit is not None and (index is None or index >= limit):
            continue
        if rules.allows(candidate.path):
            selected.append(candidate)
    if not selected:
        logger.info("nothing to defuse in %s", type(model).__name__)
        _patch_model(model)
        return False
    manager = get_plugin_manager()
    count = len(selected)
    shared = _shared_parameter_ids(model) if cleanup_original else frozenset()
    # Candidates are consumed one by one so that, once a module is replaced, nothing here
    # keeps the fused module (and copies made from it) alive: peak memory stays at the model
    # plus one module's new tensors.
    selected.reverse()
    with tqdm(total=count, desc="defusing", unit="module", disable=None, leave=False) as progress:
        while selected:
            candidate = selected.pop()
            replacement = _defuse_one(manager, candidate, model, cleanup_original, shared)
            if replacement is not candidate.module and candidate.module is not model:
                if cleanup_original:
                    _drop_fused_tensors(candidate.module)
                else:  # materialize_model (Defuser's name) releases them later
                    remember_original(candidate.module, _fused_tensor_names(candidate))
            _install(model, candidate.module, replacement)
            logger.debug("defused %s (%s) via %s", candidate.path, candidate.class_name, candidate.plugin)
            del candidate, replacement
            progress.update()
    logger.info("defused %d module(s) of %s", count, type(model).__name__)
    # save_pretrained writes the per-expert keys under the names stock transformers loads.
    from defuser.engine.checkpoint import attach_save_mapping

    attach_save_mapping(model)
    _patch_model(model)
    return True


def _fused_tensor_names(candidate: Candidate) -> tuple[str, ...]:
    """The (dotted) names of the fused tensors a replaced candidate still holds."""
    from defuser.engine.candidates import ExpertsLayout, ParallelLayout
    from defuser.engine.fuse import fused_names

    if isinstance(candidate.layout, ExpertsLayout):
        return tuple(fused_names(candidate.layout))
    if isinstance(candidate.layout, ParallelLayout):
        return (candidate.layout.weight_name,)
    return ()


def _patch_model(model: nn.Module) -> None:
    """The runtime patches the owner plugin of ``model``'s type gives it (Qwen3-Omni-MoE's text
    ``forward``); they do not count as defusing anything."""
    model_type = root_model_type(model)
    if model_type is None:
        return
    patched = get_plugin_manager().patch_model(model, model_type)
    if patched:
        logger.info("patched %s (%s): %s", type(model).__name__, model_type, ", ".join(patched))


def _shared_parameter_ids(model: nn.Module) -> frozenset[int]:
    """Ids of parameters that more than one place of ``model`` holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                (shared if id(parameter) in seen else seen).add(id(parameter))
    return frozenset(shared)


def _defuse_one(
    manager: DefuserPluginManager,
    candidate: Candidate,
    model: nn.Module | None = None,
    cleanup_original: bool = False,
    shared: frozenset[int] = frozenset(),
) -> nn.Module:
    """The replacement for one candidate; on any failure (a plugin raising mid-way, out of
    memory) the fused module (and, under accelerate offload, its offload store) is put back
    as it was (a fused weight released mid-way with ``cleanup_original`` comes back rebuilt
    from its copy, equal) and :class:`ConversionError` names its path."""
    saved = snapshot_module(candidate.module, shared)
    release = releasing_consumed(saved) if cleanup_original else contextlib.nullcontext()
    try:
        # Under accelerate dispatch, new tensors go where the fused ones were (device or offload store).
        with release, dispatched_conversion(model, candidate, cleanup_original) as placement:
            replacement = manager.defuse(candidate)
            placement.place(replacement)
        return replacement
    except BaseException as error:
        saved.restore()
        if not isinstance(error, Exception):  # KeyboardInterrupt and friends propagate as they are
            raise
        raise ConversionError(f"defusing {candidate.path} ({candidate.class_name}) failed: {error}") from error


def replace_fused_blocks(model_type: str) -> bool:
    """Patch transformers so ``model_type`` is built with defused blocks.

    Call before ``from_pretrained()``, ``from_config()`` or direct construction.  The experts
    classes of the model's modeling modules (decorated, or declared by the family's plugin) and
    its dense MLPs with a fused ``gate_up_proj`` Linear are replaced, and its checkpoint
    conversion mapping is changed so per-expert checkpoints (defuser's names, or the ones the
    stock mapping merges, e.g. Mixtral's ``w1``/``w3``/``w2``) load as they are and fused
    checkpoint tensors are split with each module's own layout.  Patching twice is harmless;
    :func:`restore_fused_blocks` undoes it and :func:`defused_blocks` limits it to a block.
    Returns False (nothing changed) for a model type no installed plugin can patch, or
    transformers older than 5.3.0.
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"replace_fused_blocks expects a model type string, got {model_type!r}")
    if not transformers_supported("replace_fused_blocks"):
        return False
    plan = get_plugin_manager().preload_plan(model_type)
    if plan is None:
        logger.info("no installed plugin patches model type %r before load", model_type)
        return False
    register_experts_implementation()
    return apply_preload_plan(plan)


def restore_fused_blocks(model_type: str | None = None) -> list[str]:
    """Undo :func:`replace_fused_blocks` for ``model_type`` (every patched type when None).

    Models built afterwards use the stock fused classes and the stock checkpoint mapping
    again; models built while patched keep their defused blocks.  A class that another
    still-patched model type shares stays patched.  Returns the model types restored (empty
    when ``model_type`` was not patched; restoring twice is harmless).
    """
    if model_type is not None and (not isinstance(model_type, str) or not model_type):
        raise TypeError(f"restore_fused_blocks expects a model type string or None, got {model_type!r}")
    restored = restore_preload_patches(model_type)
    if restored:
        logger.info("restored stock fused blocks for %s", ", ".join(restored))
    return restored


@contextlib.contextmanager
def defused_blocks(*model_types: str) -> Iterator[bool]:
    """``replace_fused_blocks`` for each of ``model_types`` within a ``with`` block, undone on exit.

    Yields True when every type was patched.  A type that was already patched when the block
    began stays patched after it, so blocks nest and repeat safely.
    """
    if not model_types:
        raise TypeError("defused_blocks expects at least one model type")
    for model_type in model_types:
        if not isinstance(model_type, str) or not model_type:
            raise TypeError(f"defused_blocks expects model type strings, got {model_type!r}")
    already = {model_type for model_type in model_types if is_patched(model_type)}
    patched: list[str] = []
    try:
        results = []
        for model_type in model_types:
            results.append(replace_fused_blocks(model_type))
            if results[-1] and model_type not in already:
                patched.append(model_type)
        yield all(results)
    finally:
        for model_type in reversed(patched):
            restore_preload_patches(model_type)


def _fusable_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    from defuser.engine.dense import split_dense_layout
    from defuser.engine.experts import DefusedExperts
    from defuser.engine.parallel import DefusedParallelExperts

    found = []
    for path, module, _ in iter_typed_modules(model):
        if isinstance(module, DefusedExperts):
            found.append((path, module, "experts"))
        elif isinstance(module, DefusedParallelExperts):
            found.append((path, module, "parallel"))
        elif split_dense_layout(module) is not None:
            found.append((path, module, "dense"))
    return found


def fuse_model(model: nn.Module, filter: Sequence[str] | None = None) -> bool:  # noqa: A002
    """Fuse a defused model back, in place: the inverse of :func:`convert_model`.

    Every defused experts module becomes its original fused class again with its fused
    tensors rebuilt from the per-expert ``nn.Linear`` weights (as views of the same storage
    when the weights are still laid out as the fused tensor, otherwise one new tensor per
    projection); split dense MLPs get their fused ``gate_up_proj`` back.  Outputs are
    unchanged and ``convert_model`` can defuse the result again.  ``filter`` takes the same
    rules as in ``convert_model``.  A module whose projections are no longer plain
    ``nn.Linear`` (quantized, wrapped) is left as it is and named in a warning.  Returns True
    when something was fused.
    """
    from defuser.engine.dense import join_dense_mlp
    from defuser.engine.fuse import NotFusable, fuse_dense_mlp, fuse_experts, fuse_parallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_model expects a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    rules = compile_filter(filter)
    selected = [entry for entry in _fusable_modules(model) if rules.allows(entry[0])]
    fused_count = 0
    for path, module, kind in tqdm(selected, desc="fusing", unit="module", disable=None, leave=False):
        try:
            if kind == "dense":
                join_dense_mlp(module, fuse_dense_mlp(module, path))
                replacement = module
            elif kind == "parallel":
                replacement = fuse_parallel(module, module.layout, path)
            else:
                replacement = fuse_experts(module, path)
        except NotFusable as reason:
            logger.warning("not fused back, left as it is: %s", reason)
            continue
        _install(model, module, replacement)
        fused_count += 1
        logger.debug("fused %s back into %s", path, type(replacement).__name__)
    if fused_count:
        logger.info("fused %d module(s) of %s back", fused_count, type(model).__name__)
    return fused_count > 0
