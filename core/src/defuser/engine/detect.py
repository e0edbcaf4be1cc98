"""Walking a model: module paths, their model types, decoder layer indices, parents."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

__all__ = ["Parents", "iter_typed_modules", "layer_index", "parents_of", "root_model_type"]

# The numbered stack segment of a path: layers.3, h.3, blocks.3, block.3, layer.3, encoders.3.
_LAYER_SEGMENT = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoders)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """Index of the decoder layer ``path`` lies in (the first numbered stack), or None."""
    match = _LAYER_SEGMENT.search(path)
    return int(match.group(1)) if match else None


def _own_model_type(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    # Only a pretrained (sub-)model defines the type of what it holds; experts carry the
    # config too but never change it.
    if model_type and hasattr(module, "base_model_prefix"):
        return str(model_type)
    return None


def root_model_type(model: nn.Module) -> str | None:
    """The model type ``model`` is converted as: its own ``config.model_type`` when it has one
    (a pretrained model, or any wrapper or sub-module that carries the config), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return str(model_type) if isinstance(model_type, str) and model_type else None


# Every ``(parent, attribute)`` pair holding a module, by ``id`` of the module: what one walk
# (:func:`iter_typed_modules` with ``parents``) records so that installing a replacement needs
# no further walk of the model.
Parents = dict[int, list[tuple[nn.Module, str]]]


def iter_typed_modules(model: nn.Module, parents: Parents | None = None) -> Iterator[tuple[str, nn.Module, str | None]]:
    """Yield ``(path, module, model_type)`` for every module, each once, in definition order.

    ``model_type`` is that of the closest enclosing pretrained model (the root counts as one
    when it carries a config), so the thinker and the talker of a composite report their own
    types.  When given, ``parents`` is filled on the way with every ``(parent, attribute)``
    pair holding each module (see :func:`parents_of`), so that one walk serves both.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module, str | None]] = [("", model, root_model_type(model))]
    while stack:
        path, module, model_type = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module, model_type
        children = []
        listed: set[int] = set()  # ``named_children`` lists a child held twice by one parent once
        for name, child in module._modules.items():
            if child is None:
                continue
            if parents is not None:
                parents.setdefault(id(child), []).append((module, name))
            if id(child) in listed:
                continue
            listed.add(id(child))
            child_path = f"{path}.{name}" if path else name
            children.append((child_path, child, _own_model_type(child) or model_type))
        stack.extend(reversed(children))


def parents_of(model: nn.Module, target: nn.Module, known: Parents | None = None) -> list[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` pair holding ``target`` (shared blocks have several).

    ``known`` (filled by :func:`iter_typed_modules`) answers without walking ``model`` while
    every pair it recorded for ``target`` still holds it; a pair changed since (a replaced
    ancestor) makes this walk the model as it is now.
    """
    recorded = known.get(id(target)) if known is not None else None
    if recorded and all(parent._modules.get(name) is target for parent, name in recorded):
        return list(recorded)
    found = []
    for module in model.modules():
        for name, child in module._modules.items():
            if child is target:
                found.append((module, name))
    return found
