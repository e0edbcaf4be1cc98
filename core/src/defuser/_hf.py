"""Every private transformers internal that pre-load patching reads or writes, one function each.

transformers gives no public way to do these things; each function says what it touches and
the releases it was verified on, so a release that changes one breaks here, in one place, and
``core/tests/test_hf_shim.py`` (run on the oldest and the newest supported release) says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "converter_patterns",
    "eager_experts_forward",
    "forget_checkpoint_conversion_mapping",
    "has_experts_gate",
    "is_experts_forward",
    "own_tied_weights_keys",
    "recorded_output_class_names",
    "set_load_check",
    "set_tied_weights_keys",
    "set_unrenamed_key_fallback",
]


def is_experts_forward(function: Any) -> bool:
    """True for the ``forward`` that ``@use_experts_implementation`` installs.

    ``functools.wraps`` hides the wrapper's name, but it keeps ``__wrapped__`` and its code
    closes over a free variable named ``original_forward`` (transformers 5.3.0 - 5.25.0)."""
    code = getattr(function, "__code__", None)
    return hasattr(function, "__wrapped__") and code is not None and "original_forward" in code.co_freevars


def eager_experts_forward(cls: type) -> Callable[..., Any] | None:
    """The class's own (eager) experts forward when ``cls.forward`` is the dispatching wrapper
    ``@use_experts_implementation`` installs, else None.

    The wrapper picks ``config._experts_implementation`` (grouped_mm, batched_mm, ...) at each
    call; the one it wraps is transformers' exact per-expert loop, reached through the
    ``__wrapped__`` that ``functools.wraps`` sets (transformers 5.3.0 - 5.25.0)."""
    forward = getattr(cls, "forward", None)
    if forward is None or not is_experts_forward(forward):
        return None
    wrapped = forward.__wrapped__
    return wrapped if callable(wrapped) else None


def has_experts_gate(cls: type) -> bool:
    """True when ``cls`` has the ``_apply_gate`` that ``@use_experts_implementation`` gives
    every class it wraps (its own or the default one; transformers 5.3.0 - 5.25.0)."""
    return hasattr(cls, "_apply_gate")


def own_tied_weights_keys(cls: type) -> Any:
    """The ``_tied_weights_keys`` that the model class ``cls`` itself defines (None when it
    inherits them): a ``{target: source}`` dict of regexes (transformers 5.3.0 - 5.25.0)."""
    return cls.__dict__.get("_tied_weights_keys")


def set_tied_weights_keys(cls: type, tied: Any) -> None:
    """Give the model class ``cls`` its own ``_tied_weights_keys`` (transformers 5.3.0 - 5.25.0)."""
    cls._tied_weights_keys = tied  # type: ignore[attr-defined]


def forget_checkpoint_conversion_mapping(key: str) -> bool:
    """Drop ``key`` from transformers' registry of checkpoint conversion mappings, so it is
    looked up as if never registered; False when this release keeps the registry elsewhere.

    There is no public way to unregister one, and registering an empty list would still count
    as "found" for a class name (hiding its model type's mapping).  Touches
    ``conversion_mapping._checkpoint_conversion_mapping_cache`` and
    ``conversion_mapping.USER_REGISTERED_MAPPINGS`` (transformers 5.3.0 - 5.25.0)."""
    from transformers import conversion_mapping

    cache = getattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    if not isinstance(cache, dict):
        return False
    cache.pop(key, None)
    registered = getattr(conversion_mapping, "USER_REGISTERED_MAPPINGS", None)
    if isinstance(registered, set):
        registered.discard(key)
    return True


def converter_patterns(transform: Any, name: str) -> list[str]:
    """The ``source_patterns`` or ``target_patterns`` (``name``) of a weight renaming or converter
    as its mapping wrote them: 5.24 and later keep those in ``_original_<name>`` and compile
    the public attribute; earlier releases keep them in the public attribute
    (transformers 5.3.0 - 5.25.0)."""
    original = getattr(transform, f"_original_{name}", None)
    patterns = original if original is not None else getattr(transform, name, [])
    return [patterns] if isinstance(patterns, str) else list(patterns)


def recorded_output_class_names(model_class: type) -> set[str]:
    """Names of the module classes whose outputs ``model_class`` records (its
    ``_can_record_outputs``: a dict of a class, a recorder, or a list of them, each recorder
    naming its class by ``target_class`` or ``class_name``, possibly a tuple; transformers
    5.3.0 - 5.25.0)."""
    names: set[str] = set()
    for recorders in (getattr(model_class, "_can_record_outputs", None) or {}).values():
        for recorder in recorders if isinstance(recorders, list) else [recorders]:
            target = getattr(recorder, "target_class", None) or getattr(recorder, "class_name", None)
            targets = target if isinstance(target, tuple) else (target if target is not None else recorder,)
            for item in targets:
                names.add(item if isinstance(item, str) else getattr(item, "__name__", ""))
    return names


def set_unrenamed_key_fallback(select: Callable[[list[Any]], list[Any]] | None) -> None:
    """While ``select`` is set, a checkpoint key whose renamed name is no key of the model (and
    whose own name is none either) is renamed once more by the converters ``select`` picks from
    the mapping's, without its renamings; that name is kept when it is a key of the model (None:
    stop).

    This extends to converters the fallback transformers takes for a key its renamings do not
    fit (a checkpoint already in the model's names, where ``(^|model\\.)layers\\.`` still matches
    ``language_model.layers.``): it loads the key under its own name when that is a key of the
    model, which the fused tensor of a defused block no longer is.  Wraps the module-level
    ``core_model_loading.rename_source_key`` that ``convert_and_load_state_dict_in_model`` calls,
    with the key, renamings, converters, base model prefix and the model's meta state dict
    (transformers 5.3.0 - 5.25.0)."""
    from transformers import core_model_loading

    current = core_model_loading.rename_source_key
    original = getattr(current, "_defuser_original", current)
    if select is None:
        core_model_loading.rename_source_key = original
        return
    signature = inspect.signature(original)

    def rename_source_key(*args: Any, **kwargs: Any) -> tuple[str, str | None]:
        renamed, pattern = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        model_keys = arguments.get("meta_state_dict")
        if (
            model_keys is None
            or arguments.get("reverse")
            or renamed in model_keys
            or arguments["source_key"] in model_keys
        ):
            return renamed, pattern
        converters = select(list(arguments.get("weight_converters") or []))
        if not converters:
            return renamed, pattern
        arguments["weight_renamings"] = []
        arguments["weight_converters"] = converters
        retried, retried_pattern = original(*bound.args, **bound.kwargs)
        if retried_pattern is not None and retried in model_keys:
            return retried, retried_pattern
        return renamed, pattern

    rename_source_key._defuser_original = original  # type: ignore[attr-defined]
    core_model_loading.rename_source_key = rename_source_key


def set_load_check(check: Any) -> None:
    """Call ``check(model, missing_keys, unexpected_keys)`` at the end of every ``from_pretrained``
    (None: stop).  Wraps ``PreTrainedModel._adjust_missing_and_unexpected_keys``, which the
    loader calls once with its ``LoadStateDictInfo`` after the weights are in, just before the
    load report is logged (transformers 5.3.0 - 5.25.0)."""
    from transformers import PreTrainedModel

    current = PreTrainedModel.__dict__["_adjust_missing_and_unexpected_keys"]
    original = getattr(current, "_defuser_original", current)
    if check is None:
        PreTrainedModel._adjust_missing_and_unexpected_keys = original  # type: ignore[method-assign]
        return

    def _adjust_missing_and_unexpected_keys(self: Any, loading_info: Any) -> None:
        original(self, loading_info)
        check(self, set(loading_info.missing_keys), set(loading_info.unexpected_keys))

    _adjust_missing_and_unexpected_keys._defuser_original = original  # type: ignore[attr-defined]
    PreTrainedModel._adjust_missing_and_unexpected_keys = _adjust_missing_and_unexpected_keys  # type: ignore[method-assign]
