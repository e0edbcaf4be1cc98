"""Pre-load patching of parallel experts (jetmoe; granite and aria in transformers 5.3).

A parallel-experts class is constructed without knowing where it sits, and its defused form
copies plain attributes from a built instance.  So these classes are not replaced:
the root model classes of the modeling modules get a ``post_init`` that first defuses every
parallel-experts instance of the model it finishes (paths relative to that model, children
built before their parents), then runs the stock ``post_init`` (weight init, tied keys, plans)
on the defused structure.  ``from_pretrained``, ``from_config`` and direct construction all end
in ``post_init``, on the meta device as on a real one.

On load, a stacked ``{path}.weight`` is split per expert (``{path}.{i}.linear.weight``) by
:class:`SplitFusedParallel`, with a converter for the places the modeling source constructs the
class (``experts.output_linear``: holder attribute and attribute, read from the source), so
other ``.weight`` keys are never touched.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from defuser.engine.candidates import ParallelLayout

__all__ = [
    "ParallelPatch",
    "defuse_parallel_experts",
    "install_post_init",
    "parallel_converters",
    "resolve_parallel",
    "source_assignments",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelPatch:
    """The parallel-experts classes of one plan, where they are constructed, and the model
    classes whose ``post_init`` defuses them."""

    layouts: dict[type, ParallelLayout]
    attribute_paths: dict[ParallelLayout, frozenset[str]]  # ``holder.attribute`` paths per layout
    roots: tuple[type, ...]


@functools.cache
def source_assignments(module_name: str) -> tuple[tuple[str, str, str], ...]:
    """``(class, target, callee)`` for every ``target = callee(...)`` assignment inside the
    classes of ``module_name``'s source, as written (``("JetMoeMoE", "self.input_linear",
    "JetMoeParallelExperts")``), in source order; empty without source.  Read once per module."""
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    except (OSError, TypeError, SyntaxError):  # no source to read
        return ()
    found = []
    for class_node in tree.body:
        if not isinstance(class_node, ast.ClassDef):
            continue
        for node in ast.walk(class_node):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                callee = ast.unparse(node.value.func)
                found += [(class_node.name, ast.unparse(target), callee) for target in node.targets]
    return tuple(found)


def _attribute_paths(module_name: str, class_name: str) -> set[str]:
    """``holder.attribute`` (or ``attribute`` where the holder's own place is unknown) for each
    place the source of ``module_name`` assigns ``self.<attribute>`` an instance of ``class_name``."""
    held: dict[str, set[tuple[str, str]]] = {}  # class name -> (holding class, attribute)
    for holder, target, callee in source_assignments(module_name):
        attribute = target.removeprefix("self.")
        if target.startswith("self.") and "." not in attribute:
            held.setdefault(callee.rsplit(".", 1)[-1], set()).add((holder, attribute))
    paths: set[str] = set()
    for holder, attribute in held.get(class_name, ()):
        outer = {holder_attribute for _, holder_attribute in held.get(holder, ())}
        paths |= {f"{name}.{attribute}" for name in outer} or {attribute}
    return paths


def _root_model_classes(module: Any) -> list[type]:
    """``PreTrainedModel`` classes of ``module`` none of whose bases is one of the module's own."""
    from transformers import PreTrainedModel

    def own(cls: Any) -> bool:
        return isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.__module__ == module.__name__

    return [cls for cls in vars(module).values() if own(cls) and not any(own(base) for base in cls.__bases__)]


def resolve_parallel(modeling_modules: tuple[str, ...], declared: dict[str, ParallelLayout]) -> ParallelPatch | None:
    """What patching ``declared`` parallel-experts classes (name -> layout) takes in
    ``modeling_modules``; None when none of them is defined there."""
    layouts: dict[type, ParallelLayout] = {}
    paths: dict[ParallelLayout, set[str]] = {}
    for module_name in modeling_modules:
        module = importlib.import_module(module_name)
        for name, layout in declared.items():
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module_name:
                layouts[cls] = layout
                paths.setdefault(layout, set()).update(_attribute_paths(module_name, name))
    if not layouts:
        return None
    roots: list[type] = []
    for module_name in modeling_modules:
        roots += _root_model_classes(importlib.import_module(module_name))
    return ParallelPatch(
        layouts=layouts,
        attribute_paths={layout: frozenset(found) for layout, found in paths.items()},
        roots=tuple(dict.fromkeys(roots)),
    )


def defuse_parallel_experts(model: nn.Module, layouts: dict[type, ParallelLayout]) -> int:
    """Replace every instance of a class in ``layouts`` inside ``model`` by its per-expert form,
    its gating read from its path relative to ``model``; returns how many were replaced."""
    from defuser.engine.parallel import DefusedParallelExperts

    replaced = 0
    for path, module in list(model.named_modules()):
        layout = layouts.get(type(module))
        if layout is None or not path:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, name, DefusedParallelExperts(module, layout, path))
        replaced += 1
    return replaced


# root model class -> the ``post_init`` in its own namespace before patching (None: inherited)
_post_init_originals: dict[type, Any] = {}


def _defusing_post_init(cls: type, layouts_now: Any) -> Any:
    own = cls.__dict__.get("post_init")

    def post_init(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        layouts = layouts_now()
        if layouts:
            defuse_parallel_experts(self, layouts)
        if own is not None:
            return own(self, *args, **kwargs)
        return super(cls, self).post_init(*args, **kwargs)

    post_init.__defuser_patch__ = True  # type: ignore[attr-defined]
    return post_init


def install_post_init(roots: set[type], layouts_now: Any) -> None:
    """Give exactly ``roots`` the defusing ``post_init`` (``layouts_now()`` says which classes
    to defuse when it runs); every other class patched before gets its own back."""
    for cls in list(_post_init_originals):
        if cls in roots:
            continue
        original = _post_init_originals.pop(cls)
        if original is None:
            if "post_init" in cls.__dict__:
                delattr(cls, "post_init")
        else:
            cls.post_init = original
    for cls in roots:
        if cls not in _post_init_originals:
            _post_init_originals[cls] = cls.__dict__.get("post_init")
            cls.post_init = _defusing_post_init(cls, layouts_now)


def parallel_converters(patches: list[ParallelPatch]) -> list[Any]:
    """Load converters splitting the stacked weights of ``patches``' classes per expert, one per
    set of places the modeling source constructs them."""
    from defuser.engine.checkpoint import SplitFusedParallel, split_on_load_converter

    converters: list[Any] = []
    seen: set[str] = set()
    for patch in patches:
        for layout, paths in patch.attribute_paths.items():
            if not paths:
                logger.warning("no place in the source constructs parallel experts of %s: not split on load", layout)
                continue
            places = "|".join(re.escape(path) for path in sorted(paths))
            source = rf"((?<![^.])(?:{places})\.){re.escape(layout.weight_name)}$"
            if source in seen:
                continue
            seen.add(source)
            (stacked,) = layout.tensors()
            target = stacked.load_target
            converters.append(
                split_on_load_converter(source, r"\1" + target, [SplitFusedParallel(layout.weight_name, target)])
            )
    return converters
