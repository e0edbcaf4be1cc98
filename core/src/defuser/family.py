"""Declaring a model family in a few lines: the base most plugins are made of.

A plugin module creates one :class:`Family` and exposes it through its entry point::

    plugin = Family(
        name="qwen",
        model_types=[TypeSupport("qwen3_moe"), TypeSupport("qwen3_vl_moe", notes="...")],
    )

The family claims its model types; decorated experts are read from transformers' own flags
and dense ``gate_up_proj`` MLPs are found by shape.  What differs is declared per class name:
``dense_classes`` (another fused name, reversed halves), ``experts_classes`` (undecorated
experts: an :class:`ExpertsDecl` of their :class:`ExpertsLayout` fields), ``parallel_classes``
(stacked per-expert projections routed by the parent) and ``layout_overrides`` (a
:class:`LayoutOverride` of the quirks of decorated classes, and subclasses of them that
override ``forward``, which nothing else describes; both also take a plain mapping of the
fields, converted).  A wrong declaration (an unknown field, an impossible combination) raises
:class:`~defuser.errors.DeclarationError` naming plugin, class and field when the family is
built; a tensor or activation name the class lacks, when a module of it is first detected.
``model_patches``
maps a model type to a function patching a converted model's runtime behaviour (returns what
it patched); ``tiny_models`` gives the recipes of tiny random models its types need beyond
core's generic shrinking (:class:`defuser.plugin_info.TinyModel`).
Override a method (keeping its ``@hookimpl``) only for what declarations cannot say.

A class the family does not declare is held to its decorator's flags: a subclass overriding
``forward``, or tensors the flags do not name, make it a refusal, not a guess.  An
``experts_classes`` declaration applies while transformers leaves the class undecorated; once
a release decorates it, the flags describe it and the generic engine takes it over (the plugin
manager logs that).  ``tested_on`` names the transformers releases the family was tested on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from defuser.compat import transformers_version
from defuser.declarations import (
    ExpertsDecl,
    LayoutOverride,
    checked_override,
    experts_declaration,
    layout_override,
)
from defuser.engine.candidates import DenseLayout, ParallelLayout
from defuser.errors import DeclarationError, DeclarationMismatch
from defuser.hookspecs import hookimpl
from defuser.plugin_info import PluginInfo, TinyModel, TypeSupport

# Importing a plugin's hooks module (which builds a Family) must not import torch or
# transformers: the engine is imported where a hook first needs it.
if TYPE_CHECKING:
    from torch import nn

    from defuser.engine.candidates import Candidate
    from defuser.engine.preload import PreloadPlan

__all__ = [
    "ExpertsDecl",
    "Family",
    "LayoutOverride",
    "modeling_module_for",
    "modeling_modules_for",
    "preload_plan_for",
]

logger = logging.getLogger(__name__)


def modeling_module_for(model_type: str) -> str:
    """Import path of the transformers modeling module that defines ``model_type``."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    return f"transformers.models.{module}.modeling_{module}"


class Family:
    """A declarative plugin for one family of model types."""

    def __init__(
        self,
        name: str,
        model_types: Iterable[TypeSupport],
        *,
        dense_classes: Mapping[str, DenseLayout] | None = None,
        experts_classes: Mapping[str, ExpertsDecl | Mapping[str, Any]] | None = None,
        parallel_classes: Mapping[str, ParallelLayout] | None = None,
        layout_overrides: Mapping[str, LayoutOverride | Mapping[str, Any]] | None = None,
        key_renames: Mapping[str, Iterable[tuple[str, str]]] | None = None,
        legacy_projection_names: Mapping[str, Mapping[str, str]] | None = None,
        dense_key_patterns: Mapping[str, Iterable[str]] | None = None,
        model_patches: Mapping[str, Callable[[nn.Module], list[str]]] | None = None,
        transformers: str = ">=5.3.0",
        core: str = ">=0.1,<1",
        priority: int = 0,
        description: str = "",
        tested_on: Iterable[str] = (),
        tiny_models: Mapping[str, TinyModel] | None = None,
        model_code: Iterable[str] = (),
    ):
        self.info = PluginInfo(
            name=name,
            model_types=tuple(model_types),
            transformers=transformers,
            core=core,
            priority=priority,
            description=description,
            tested_on=tuple(tested_on),
            tiny_models=dict(tiny_models or {}),
        )
        self.dense_classes = _layouts_of(name, "dense_classes", DenseLayout, dense_classes or {})
        self.experts_classes = dict(experts_classes or {})
        self.parallel_classes = _layouts_of(name, "parallel_classes", ParallelLayout, parallel_classes or {})
        self.layout_overrides = dict(layout_overrides or {})
        self.key_renames = {key: tuple(value) for key, value in (key_renames or {}).items()}
        self.legacy_projection_names = {key: dict(value) for key, value in (legacy_projection_names or {}).items()}
        self.dense_key_patterns = {key: tuple(value) for key, value in (dense_key_patterns or {}).items()}
        self.model_patches = dict(model_patches or {})
        self.model_code = tuple(model_code)
        for module_name in self.model_code:
            if not (isinstance(module_name, str) and all(part.isidentifier() for part in module_name.split("."))):
                raise DeclarationError(f"plugin {name!r}: model_code holds {module_name!r}, not a module name")

    @property
    def experts_classes(self) -> dict[str, ExpertsDecl]:
        """Undecorated experts classes: class name -> :class:`ExpertsDecl`."""
        return self._experts_classes

    @experts_classes.setter
    def experts_classes(self, declarations: Mapping[str, ExpertsDecl | Mapping[str, Any]]) -> None:
        name = self.info.name
        self._experts_classes = {cls: experts_declaration(name, cls, value) for cls, value in declarations.items()}

    @property
    def layout_overrides(self) -> dict[str, LayoutOverride]:
        """Quirks of decorated experts classes: class name -> :class:`LayoutOverride`."""
        return self._layout_overrides

    @layout_overrides.setter
    def layout_overrides(self, overrides: Mapping[str, LayoutOverride | Mapping[str, Any]]) -> None:
        name = self.info.name
        self._layout_overrides = {cls: layout_override(name, cls, value) for cls, value in overrides.items()}

    def __repr__(self) -> str:
        return f"Family({self.info.name!r}, {len(self.info.model_types)} model types)"

    @property
    def declared_classes(self) -> frozenset[str]:
        """Class names this family declares (dense, parallel, undecorated experts, overrides):
        recognised by class wherever they sit, whatever model type encloses them."""
        return frozenset([*self.dense_classes, *self.parallel_classes, *self.experts_classes, *self.layout_overrides])

    @hookimpl
    def defuser_plugin_info(self) -> PluginInfo:
        return self.info

    @hookimpl
    def defuser_detect_candidate(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        from defuser.engine.candidates import Candidate, read_experts_layout
        from defuser.engine.contract import contract_refusal, decorated_class
        from defuser.engine.generic import dense_layout_of
        from defuser.engine.parallel import parallel_weight

        class_name = type(module).__name__
        if not self.info.claims(model_type) and class_name not in self.declared_classes:
            return None
        if class_name in self.dense_classes:
            dense = dense_layout_of(module, self.dense_classes[class_name])
            return None if dense is None else Candidate(path, module, "dense", self.info.name, dense, model_type)
        if class_name in self.parallel_classes:
            parallel = self.parallel_classes[class_name]
            if parallel_weight(module, parallel) is None:
                return None
            return Candidate(path, module, "parallel", self.info.name, parallel, model_type)
        if class_name in self.experts_classes:
            if decorated_class(type(module)) is not None:
                # A release decorated the class: its flags, not this declaration, describe it.
                raise DeclarationMismatch(
                    f"{class_name} is declared as undecorated experts, but transformers {transformers_version()} "
                    "decorates it with @use_experts_implementation"
                )
            layout = self.experts_classes[class_name].layout_of(module, self.info.name, class_name)
        else:
            layout = read_experts_layout(module)
        if layout is None:
            return None
        # A declared class is described by its declaration; any other is held to its decorator's flags.
        declared = class_name in self.experts_classes or class_name in self.layout_overrides
        refusal = "" if declared else contract_refusal(module, layout)
        override = self.layout_overrides.get(class_name)
        if override is not None:
            layout = checked_override(module, layout, override, self.info.name, class_name)
        return Candidate(path, module, "experts", self.info.name, layout, model_type, refusal=refusal)

    @hookimpl
    def defuser_register_models(self) -> list[str] | None:
        if not self.model_code:
            return None
        import importlib

        for module_name in self.model_code:
            importlib.import_module(module_name)
        return [support.model_type for support in self.info.model_types]

    @hookimpl
    def defuser_patch_model(self, model: nn.Module, model_type: str) -> list[str] | None:
        patch = self.model_patches.get(model_type)
        return None if patch is None else list(patch(model))

    @hookimpl
    def defuser_preload_plan(self, model_type: str) -> PreloadPlan | None:
        support = self.info.support_for(model_type)
        if support is None or not support.preload:
            return None
        return preload_plan_for(
            model_type,
            related_types=[t.model_type for t in self.info.model_types],
            declared_experts={name: decl.changes() for name, decl in self.experts_classes.items()},
            layout_overrides={name: override.changes() for name, override in self.layout_overrides.items()},
            dense_classes=dict(self.dense_classes),
            key_renames=self.key_renames.get(model_type, ()),
            legacy_projection_names=self.legacy_projection_names.get(model_type, {}),
            dense_key_patterns=self.dense_key_patterns.get(model_type, ()),
            parallel_classes=dict(self.parallel_classes),
        )


_L = TypeVar("_L", DenseLayout, ParallelLayout)


def _layouts_of(plugin: str, argument: str, kind: type[_L], declared: Mapping[str, _L]) -> dict[str, _L]:
    """``declared`` as a dict, each value checked to be a ``kind`` (DeclarationError if not)."""
    for class_name, layout in declared.items():
        if not isinstance(layout, kind):
            raise DeclarationError(
                f"plugin {plugin!r}, class {class_name!r}: {argument} takes a {kind.__name__}, "
                f"got {type(layout).__name__} {layout!r}"
            )
    return dict(declared)


def preload_plan_for(model_type: str, related_types: Iterable[str] = (), **declarations: Any) -> PreloadPlan | None:
    """The :class:`PreloadPlan` patching ``model_type``'s modeling modules (None when it has
    none): its checkpoint mapping, those of its sub-configs, of ``related_types`` sharing its
    modules and of its model classes with a mapping of their own change too.
    ``declarations`` are the plan's class declarations (``declared_experts``, ...)."""
    from defuser.engine.preload import PreloadPlan

    module_names = modeling_modules_for(model_type)
    if not module_names:
        return None
    # Sub-models (thinker, talker, text-only, sub-configs) load through their own model
    # types, and some models through their classes' names: their mappings change too.
    related = [
        t
        for t in set(related_types)
        if t != model_type and set(modeling_modules_for(t, nested=False)) & set(module_names)
    ]
    mapping_keys = [model_type, *sorted(related), *_sub_config_types(model_type)]
    mapping_keys += _mapped_class_names(module_names)
    return PreloadPlan(
        model_type=model_type,
        mapping_types=tuple(dict.fromkeys(mapping_keys)),
        modeling_modules=tuple(module_names),
        **declarations,
    )


def _config_class(model_type: str) -> type | None:
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except Exception:  # a type this transformers does not know
        return None


def _sub_config_types(model_type: str, seen: set[str] | None = None) -> list[str]:
    """Model types of the sub-configs of ``model_type``, recursively: those of its default
    config (which fills generic ``AutoConfig`` slots), else those its class declares."""
    seen = {model_type} if seen is None else seen
    config_class = _config_class(model_type)
    if config_class is None:
        return []
    try:
        config = config_class()
        subs = [value for value in vars(config).values() if hasattr(value, "to_dict") and hasattr(value, "model_type")]
    except Exception:  # a default config that cannot be built as shipped
        subs = list((getattr(config_class, "sub_configs", None) or {}).values())
    found = []
    for sub in subs:
        sub_type = getattr(sub, "model_type", None)
        if not isinstance(sub_type, str) or not sub_type or sub_type in seen:
            continue
        seen.add(sub_type)
        found += [sub_type, *_sub_config_types(sub_type, seen)]
    return found


def modeling_modules_for(model_type: str, nested: bool = True) -> list[str]:
    """Import paths of the transformers modeling modules whose classes a ``model_type`` model is
    built from: the config's own module, the modules of its Auto model classes (a type may
    reuse another family's model) and, with ``nested``, those of its sub-configs."""
    import importlib

    types = [model_type, *(_sub_config_types(model_type) if nested else [])]
    names: list[str] = []
    for current in types:
        config_class = _config_class(current)
        if config_class is None:
            continue
        names.append(config_class.__module__.replace(".configuration_", ".modeling_"))
        names += _auto_model_modules(current)
        if not config_class.__module__.startswith("transformers."):
            names += _registered_model_modules(config_class)
    found = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ImportError:  # no modeling module of that name, or a missing optional dependency
            continue
        found.append(name)
    return found


def _auto_model_modules(model_type: str) -> list[str]:
    import transformers
    from transformers.models.auto import modeling_auto

    modules = []
    for mapping in (modeling_auto.MODEL_MAPPING_NAMES, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        names = mapping.get(model_type, ())
        for name in (names,) if isinstance(names, str) else names:
            try:
                modules.append(getattr(transformers, name).__module__)
            except Exception:  # not importable here
                continue
    return modules


def _registered_model_modules(config_class: type) -> list[str]:
    """Modules of the model classes a package registered for ``config_class`` with
    ``AutoModel.register`` / ``AutoModelForCausalLM.register`` (a family transformers does not
    ship, whose modules need not follow its ``configuration_*`` / ``modeling_*`` naming)."""
    from transformers.models.auto import modeling_auto

    modules = []
    for mapping in (modeling_auto.MODEL_MAPPING, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING):
        try:
            modules.append(mapping[config_class].__module__)
        except Exception:  # not registered there
            continue
    return modules


def _mapped_class_names(module_names: list[str]) -> list[str]:
    """Model classes of ``module_names`` that transformers gives a checkpoint mapping of their own
    (looked up before the model type's)."""
    import importlib

    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    names = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, PreTrainedModel)
                and value.__module__ == module_name
                and get_checkpoint_conversion_mapping(name) is not None
            ):
                names.append(name)
    return names
