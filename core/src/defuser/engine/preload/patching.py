"""Applying and undoing the pre-load patches of model types."""

from __future__ import annotations

import logging

from defuser._hf import set_load_check
from defuser.engine.parallel_preload import install_post_init, resolve_parallel
from defuser.engine.preload.classes import install_classes, recorded_class_names, resolve_classes
from defuser.engine.preload.loadcheck import check_defused_loaded
from defuser.engine.preload.mappings import install_mappings, mapping_keys
from defuser.engine.preload.plan import PreloadPlan
from defuser.engine.preload.state import PATCHES, ActivePatch
from defuser.engine.preload.ties import install_ties, untied_fused_tensors

__all__ = ["apply_preload_plan", "is_patched", "patched_model_types", "restore_preload_patches"]

logger = logging.getLogger(__name__)


def _install() -> None:
    from defuser.engine.distributed_preload import sync_distributed_preload

    install_classes()
    install_ties()
    set_load_check(check_defused_loaded if PATCHES.active else None)
    # Parallel plans of models built while patched must match their defused blocks.
    sync_distributed_preload(active=bool(PATCHES.active))
    roots = {root for active in PATCHES.active.values() if active.parallel for root in active.parallel.roots}
    install_post_init(roots, PATCHES.parallel_layouts)


def apply_preload_plan(plan: PreloadPlan) -> bool:
    """Register the class replacements and checkpoint mapping of ``plan`` (idempotent)."""
    with PATCHES.lock:
        if plan.model_type in PATCHES.active:
            return True
        classes, tensor_names, dense_names = resolve_classes(plan)
        parallel = resolve_parallel(plan.modeling_modules, plan.parallel_classes) if plan.parallel_classes else None
        if not classes and parallel is None:
            logger.warning("nothing to patch for model type %r in %s", plan.model_type, plan.modeling_modules)
            return False
        active = ActivePatch(plan, classes, tensor_names, frozenset(dense_names), parallel=parallel)
        active.recorded = recorded_class_names(plan.modeling_modules, {name for _, name in classes})
        active.tied = untied_fused_tensors(plan.modeling_modules, tensor_names)
        PATCHES.active[plan.model_type] = active
        try:
            _install()
            install_mappings(set(mapping_keys(plan)))
        except BaseException:
            del PATCHES.active[plan.model_type]
            _install()
            install_mappings(set(mapping_keys(plan)))
            raise
        names = sorted({name for _, name in classes} | {cls.__name__ for cls in (parallel.layouts if parallel else ())})
        logger.info("patched %s before load: %s", plan.model_type, ", ".join(names))
        return True


def is_patched(model_type: str) -> bool:
    """True while ``model_type`` is patched by :func:`apply_preload_plan`."""
    return model_type in PATCHES.active


def patched_model_types() -> list[str]:
    """The model types patched now, in the order they were patched."""
    return list(PATCHES.active)


def restore_preload_patches(model_type: str | None = None) -> list[str]:
    """Undo :func:`apply_preload_plan` for ``model_type`` (all when None); returns the types restored.

    A class or checkpoint mapping that another patched model type still needs stays patched.
    """
    with PATCHES.lock:
        types = [model_type] if model_type is not None else list(PATCHES.active)
        removed = [PATCHES.active.pop(current) for current in types if current in PATCHES.active]
        if not removed:
            return []
        _install()
        install_mappings({key for active in removed for key in mapping_keys(active.plan)})
        return [active.plan.model_type for active in removed]
