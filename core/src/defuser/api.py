"""The public entry points: ``convert_model`` and ``replace_fused_blocks``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from tqdm.auto import tqdm

from defuser.compat import transformers_supported
from defuser.engine.candidates import Candidate
from defuser.engine.detect import iter_typed_modules, layer_index, parents_of
from defuser.engine.experts import register_experts_implementation
from defuser.engine.preload import apply_preload_plan
from defuser.filtering import compile_filter
from defuser.plugins import get_plugin_manager

__all__ = ["ConversionError", "convert_model", "find_candidates", "replace_fused_blocks"]

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


def _install(model: nn.Module, candidate: Candidate, replacement: nn.Module) -> None:
    if replacement is candidate.module:
        return
    for parent, name in parents_of(model, candidate.module):
        parent._modules[name] = replacement


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
        return False
    manager = get_plugin_manager()
    for candidate in tqdm(selected, desc="defusing", unit="module", disable=None, leave=False):
        try:
            replacement = manager.defuse(candidate)
        except Exception as error:
            raise ConversionError(f"defusing {candidate.path} ({candidate.class_name}) failed: {error}") from error
        _install(model, candidate, replacement)
        if cleanup_original and replacement is not candidate.module:
            _drop_fused_tensors(candidate.module)
        logger.debug("defused %s (%s) via %s", candidate.path, candidate.class_name, candidate.plugin)
    logger.info("defused %d module(s) of %s", len(selected), type(model).__name__)
    return True


def replace_fused_blocks(model_type: str) -> bool:
    """Patch transformers so ``model_type`` is built with defused blocks.

    Call before ``from_pretrained()``, ``from_config()`` or direct construction.  The
    family's experts classes (and listed dense MLPs) are replaced through transformers'
    ``register_patch_mapping``, and its checkpoint conversion mapping is changed so both
    fused checkpoints and per-expert checkpoints (including legacy key names) load into the
    defused modules.  Patching twice is harmless.  Returns False (nothing changed) for a
    model type no installed plugin can patch, or transformers older than 5.3.0.
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
