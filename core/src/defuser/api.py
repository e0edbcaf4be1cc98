"""The public entry points: ``convert_model``, ``fuse_model``, ``replace_fused_blocks`` and its undo."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from torch import nn
from tqdm.auto import tqdm

from defuser.compat import transformers_supported
from defuser.engine.candidates import Candidate
from defuser.engine.detect import Parents, iter_typed_modules, layer_index, parents_of, root_model_type
from defuser.engine.distributed import DistributedPlanError, ModuleSharding, refuse_unsupported
from defuser.engine.experts import register_experts_implementation
from defuser.engine.hooks import module_hooks
from defuser.engine.kinds import KINDS, defused_kind
from defuser.engine.layout import collector_paused
from defuser.engine.offload import dispatched_conversion
from defuser.engine.preload import apply_preload_plan, is_patched, restore_preload_patches
from defuser.engine.selfcheck import SelfCheck, SelfCheckError
from defuser.engine.sharded_convert import defuse_sharded, fuse_sharded, is_sharded_defused
from defuser.engine.transaction import ModuleSnapshot, releasing_consumed, snapshot_module
from defuser.errors import ConversionError
from defuser.filtering import PathFilter, compile_filter
from defuser.modeling.replace_modules import drop_fused_tensors, remember_original
from defuser.plugins import DefuserPluginManager, get_plugin_manager

__all__ = [
    "ConversionError",
    "DistributedPlanError",
    "convert_model",
    "defused_blocks",
    "find_candidates",
    "fuse_model",
    "replace_fused_blocks",
    "restore_fused_blocks",
]

logger = logging.getLogger(__name__)


def _check_max_layers(max_layers: object) -> int | None:
    if max_layers is None:
        return None
    if isinstance(max_layers, bool) or not isinstance(max_layers, int):
        raise TypeError(f"max_layers must be a positive int or None, got {type(max_layers).__name__}: {max_layers!r}")
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    return max_layers


def _detect(model: nn.Module, parents: Parents | None = None) -> list[Candidate]:
    """Every fused block of ``model`` and who defuses it, refused ones included (one walk of
    the model, which also fills ``parents`` when given)."""
    manager = get_plugin_manager()
    found = []
    for path, module, model_type in iter_typed_modules(model, parents):
        candidate = manager.detect(module, path, model_type)
        if candidate is not None:
            if candidate.generic and not candidate.refusal and manager.owner_of(model_type) is None:
                logger.info("%s (%s, model type %s) handled generically", path, candidate.class_name, model_type)
            found.append(candidate)
    return found


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every fused block of ``model`` that an installed plugin (or the generic engine) can defuse
    (refused ones, which ``convert_model`` reports as an error, left out)."""
    return [candidate for candidate in _detect(model) if not candidate.refusal]


def _refusal_error(refused: list[Candidate]) -> ConversionError:
    """One error naming every refused module (grouped by class and reason); nothing changed yet."""
    groups: dict[tuple[str, str | None, str], list[str]] = {}
    for candidate in refused:
        groups.setdefault((candidate.class_name, candidate.model_type, candidate.refusal), []).append(candidate.path)
    parts = []
    for (class_name, model_type, reason), paths in groups.items():
        where = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        parts.append(f"{where} ({class_name}, model type {model_type!r}): {reason}")
    return ConversionError(
        f"cannot defuse {len(refused)} module(s), so the model was left as it was: {'; '.join(parts)}. "
        "Leave them out with filter=['-:<path regex>'] (or max_layers) to convert the rest."
    )


def _install(model: nn.Module, old: nn.Module, replacement: nn.Module, parents: Parents | None = None) -> None:
    """Put ``replacement`` wherever ``old`` sits in ``model`` (``parents``, recorded by the walk
    that found it, saves walking the model again); when ``old`` is ``model`` itself (a bare
    experts module converted on its own), ``model`` becomes ``replacement`` in place."""
    if replacement is old:
        return
    if old is model:
        _become(model, replacement)
        return
    for parent, name in parents_of(model, old, parents):
        parent._modules[name] = replacement


def _become(target: nn.Module, source: nn.Module) -> None:
    """Make the object ``target`` the module ``source`` (class and state), so a caller's
    reference to the root sees the replacement; ``source`` is not used afterwards."""
    state = dict(source.__dict__)
    target.__dict__.clear()
    target.__dict__.update(state)
    target.__class__ = type(source)


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

    Every conversion checks itself (:mod:`defuser.engine.selfcheck`): a module whose structure
    is not known (a subclass overriding ``forward``, tensors no layout names) is refused with
    :class:`ConversionError` before anything changes; each replacement must keep every tensor
    its layout does not consume; and the first module of each class is probed against its
    fused original (``DEFUSER_VERIFY=0`` turns that off, ``DEFUSER_VERIFY=all`` probes all).
    Each per-expert weight keeps the ``requires_grad`` of the fused tensor it comes from.
    Forward, forward pre- and full backward hooks registered on a replaced module follow its
    replacement (which shares its hook dictionaries, so their handles still remove them);
    hooks that cannot follow (on a fused ``gate_up_proj`` Linear, on a fused tensor,
    state-dict hooks) make that module's conversion fail, naming them.  The per-expert
    weights are new ``nn.Parameter`` objects: an optimizer created before the conversion
    still holds the fused parameters and never updates the per-expert ones (zero-copy
    layouts share storage, so changes written into a fused parameter show through; copy
    layouts share nothing).  Create optimizers after converting.  On a model that
    transformers' distributed loading sharded (``tp_plan``, ``distributed_config``), a module
    whose sharding defuser cannot keep exact raises :class:`DistributedPlanError`, naming the
    module and the plan, before anything changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    limit = _check_max_layers(max_layers)
    rules = compile_filter(filter)
    if not transformers_supported("convert_model"):
        return False
    # Thousands of modules made: see collector_paused.
    with collector_paused():
        return _convert(model, cleanup_original, limit, rules)


def _convert(model: nn.Module, cleanup_original: bool, limit: int | None, rules: PathFilter) -> bool:
    manager = get_plugin_manager()
    check = SelfCheck(model, manager)  # reads DEFUSER_VERIFY
    register_experts_implementation()
    # One walk of the model finds the candidates and where each sits (where to install its
    # replacement): nothing below walks the whole model again.
    parents: Parents = {}
    selected = []
    for candidate in _detect(model, parents):
        index = layer_index(candidate.path)
        if limit is not None and (index is None or index >= limit):
            continue
        if rules.allows(candidate.path):
            selected.append(candidate)
    if not selected:
        logger.info("nothing to defuse in %s", type(model).__name__)
        _patch_model(model)
        return False
    refused = [candidate for candidate in selected if candidate.refusal]
    if refused:
        raise _refusal_error(refused)
    if _nested(selected):  # an outer replacement may hold an inner candidate: find parents anew
        parents = None
    # Under a distributed plan: anything defuser cannot convert exactly is refused before any change.
    shardings = refuse_unsupported(model, selected)
    count = len(selected)
    shared = _shared_parameter_ids(model) if cleanup_original else frozenset()
    # The stock checkpoint mapping the save mapping builds on, read while the model still has
    # its few fused modules (transformers walks every module to read it).
    from defuser.engine.checkpoint import attach_save_mapping, stock_save_conversions

    stock = stock_save_conversions(model)
    # The first module of each class and layout is defused and self-checked before any other,
    # and installed only once all of them passed: a failed check leaves the model as it was.
    first = check.first_modules(selected)
    held = _defuse_held(manager, first, model, cleanup_original, shared, check, shardings)
    # The rest are consumed one by one so that, once a module is replaced, nothing here keeps
    # the fused module (and copies made from it) alive: peak memory stays at the model plus
    # one module's new tensors.
    selected = [candidate for candidate in reversed(selected) if all(candidate is not f for f in first)]
    del first
    with tqdm(total=count, desc="defusing", unit="module", disable=None, leave=False) as progress:
        while held or selected:
            if held:
                candidate, replacement = held.pop()
            else:
                candidate = selected.pop()
                sharding = shardings.get(id(candidate.module))
                replacement, _ = _defuse_one(manager, candidate, model, cleanup_original, shared, check, sharding)
            if replacement is not candidate.module and candidate.module is not model:
                if cleanup_original:
                    drop_fused_tensors(candidate.module, _fused_tensor_names(candidate))
                else:  # materialize_model (Defuser's name) releases them later
                    remember_original(candidate.module, _fused_tensor_names(candidate))
            _install(model, candidate.module, replacement, parents)
            logger.debug("defused %s (%s) via %s", candidate.path, candidate.class_name, candidate.plugin)
            del candidate, replacement
            progress.update()
    check.report()
    logger.info("defused %d module(s) of %s", count, type(model).__name__)
    # save_pretrained writes the per-expert keys under the names stock transformers loads.
    if stock is not None:
        attach_save_mapping(model, stock)
    _patch_model(model)
    return True


def _nested(candidates: list[Candidate]) -> bool:
    """True when a candidate lies inside another one (the model itself included)."""
    paths = {candidate.path for candidate in candidates}
    for path in paths:
        parts = path.split(".") if path else []
        if any(".".join(parts[:depth]) in paths for depth in range(len(parts))):
            return True
    return False


def _fused_tensor_names(candidate: Candidate) -> tuple[str, ...]:
    """The (dotted) names of the fused tensors a replaced candidate still holds (a dense MLP's
    fused Linear is not kept by its replacement: none)."""
    return KINDS[candidate.kind].replaced_tensor_names(candidate)


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


def _defuse_held(
    manager: DefuserPluginManager,
    candidates: list[Candidate],
    model: nn.Module,
    cleanup_original: bool,
    shared: frozenset[int],
    check: SelfCheck,
    shardings: dict[int, ModuleSharding],
) -> list[tuple[Candidate, nn.Module]]:
    """Defuse ``candidates`` without installing them, in reverse order (ready to pop); when one
    fails, every one defused before is put back as it was too."""
    done: list[tuple[Candidate, nn.Module, ModuleSnapshot]] = []
    try:
        for candidate in candidates:
            sharding = shardings.get(id(candidate.module))
            done.append((candidate, *_defuse_one(manager, candidate, model, cleanup_original, shared, check, sharding)))
    except BaseException:
        for _, _, saved in reversed(done):
            saved.restore()
        raise
    return [(candidate, replacement) for candidate, replacement, _ in reversed(done)]


def _defuse_one(
    manager: DefuserPluginManager,
    candidate: Candidate,
    model: nn.Module | None = None,
    cleanup_original: bool = False,
    shared: frozenset[int] = frozenset(),
    check: SelfCheck | None = None,
    sharding: ModuleSharding | None = None,
) -> tuple[nn.Module, ModuleSnapshot]:
    """The replacement for one candidate (self-checked, see :mod:`defuser.engine.selfcheck`;
    shard by shard when ``sharding`` says transformers' distributed loading sharded it) and the
    snapshot that undoes it; on any failure (a plugin raising mid-way, out of memory, a failed
    self-check) the fused module (and, under accelerate offload, its offload store) is put back
    as it was (a fused weight released mid-way with ``cleanup_original`` comes back rebuilt
    from its copy, equal) and :class:`ConversionError` names its path."""
    saved = snapshot_module(candidate.module, shared)
    hooks = module_hooks(candidate.module, candidate.path)
    release = releasing_consumed(saved) if cleanup_original else contextlib.nullcontext()
    probe = None
    try:
        # A sharded module's forward talks to the other ranks: the distributed tests check those.
        probe = check.prepare(candidate) if check is not None and sharding is None else None
        # Under accelerate dispatch, new tensors go where the fused ones were (device or offload store).
        with release, dispatched_conversion(model, candidate, cleanup_original) as placement:
            if sharding is None:
                replacement = manager.defuse(candidate)
            else:
                replacement = defuse_sharded(manager, candidate, sharding, model)
            hooks.follow(replacement)  # the fused module's forward and backward hooks, or an error
            placement.place(replacement)
            if check is not None and probe is not None:
                check.verify(candidate, probe, replacement)
        return replacement, saved
    except BaseException as error:
        saved.restore()
        if not isinstance(error, Exception):  # KeyboardInterrupt and friends propagate as they are
            raise
        hint = ""
        if isinstance(error, SelfCheckError) and check is not None and probe is not None:
            hint = check.suspect_flags(candidate, probe)
        raise ConversionError(
            f"defusing {candidate.path} ({candidate.class_name}) failed: {error}{hint} "
            "(the module was put back as it was)"
        ) from error


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


def _fusable_modules(model: nn.Module, parents: Parents | None = None) -> list[tuple[str, nn.Module, str]]:
    found = []
    for path, module, _ in iter_typed_modules(model, parents):
        kind = defused_kind(module)
        if kind is not None:
            found.append((path, module, kind.name))
    return found


def fuse_model(model: nn.Module, filter: Sequence[str] | None = None) -> bool:  # noqa: A002
    """Fuse a defused model back, in place: the inverse of :func:`convert_model`.

    Every defused experts module becomes its original fused class again with its fused
    tensors rebuilt from the per-expert ``nn.Linear`` weights (as views of the same storage
    when the weights are still laid out as the fused tensor, otherwise one new tensor per
    projection); split dense MLPs get their fused ``gate_up_proj`` back.  Outputs are
    unchanged and ``convert_model`` can defuse the result again.  ``filter`` takes the same
    rules as in ``convert_model``.  Each fused tensor keeps the ``requires_grad`` of the
    weights it joins, and hooks registered on a defused module follow its fused form.  Under
    accelerate offload the fused tensors are written to the offload store (the per-expert
    entries leave it) and the fused module gets hooks of its own.  A module that cannot be
    fused exactly (projections no longer plain ``nn.Linear``, joined weights that differ in
    ``requires_grad``, hooks on a per-expert module) is left as it is and named in a warning;
    one whose fusion fails otherwise is put back as it was and ``FusionError`` names it.
    Returns True when something was fused.
    """
    from defuser.engine.fuse import NotFusable
    from defuser.engine.fuse_back import fuse_back

    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_model expects a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    rules = compile_filter(filter)
    parents: Parents = {}  # filled by the one walk of the model, read to put each fused module in place
    selected = [entry for entry in _fusable_modules(model, parents) if rules.allows(entry[0])]
    fused_count = 0
    for path, module, kind in tqdm(selected, desc="fusing", unit="module", disable=None, leave=False):
        sharded = is_sharded_defused(module)
        try:
            if sharded:  # back to the fused form sharded as transformers shards it
                replacement = fuse_sharded(module, path)
            else:
                replacement = fuse_back(model, path, module, kind, parents)
        except NotFusable as reason:
            logger.warning("not fused back, left as it is: %s", reason)
            continue
        if sharded or module is model:  # fuse_back puts it in place below the root itself
            _install(model, module, replacement, parents)
        fused_count += 1
        logger.debug("fused %s back into %s", path, type(replacement).__name__)
    if fused_count:
        logger.info("fused %d module(s) of %s back", fused_count, type(model).__name__)
    return fused_count > 0
