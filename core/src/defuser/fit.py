"""How an installed plugin fits the installed transformers (``defuser plugins``).

A plugin lists the transformers releases it was tested on (``PluginInfo.tested_on``).  On any
other release it still runs, and what it declares is checked against that release: a class it
declares as undecorated experts that the release decorates, or one the release no longer
has, is handled by the generic engine instead (self-checked); a model type it claims without
any declaration for its classes is read from the decorator's flags, as the generic engine
would.  :func:`generic_takeovers` says, per claimed model type, which of these applies, and
:func:`absent_declarations` names declared classes the release no longer has.
"""

from __future__ import annotations

import importlib
from typing import Any

from defuser.compat import transformers_version
from defuser.plugin_info import PluginInfo

__all__ = ["absent_declarations", "claimed_here", "generic_takeovers", "untested_here"]


def untested_here(info: PluginInfo | None) -> str | None:
    """The installed transformers release when the plugin was not tested on it, else None."""
    installed = transformers_version()
    if info is None or installed is None or info.tested_with(installed):
        return None
    return str(installed)


def claimed_here(info: PluginInfo | None) -> list[str]:
    """The model types ``info`` claims that exist in the installed transformers."""
    from transformers import CONFIG_MAPPING

    return [
        support.model_type for support in (info.model_types if info else ()) if support.model_type in CONFIG_MAPPING
    ]


def _classes_of(model_type: str) -> dict[str, type]:
    from defuser.family import modeling_modules_for

    classes: dict[str, type] = {}
    for name in modeling_modules_for(model_type):
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == name:
                classes.setdefault(attribute, value)
    return classes


def absent_declarations(plugin: Any) -> list[str]:
    """Class names ``plugin`` (a :class:`defuser.family.Family`) declares that no modeling module
    of its model types defines in the installed transformers (renamed or removed)."""
    from defuser.family import Family

    if not isinstance(plugin, Family):
        return []
    defined: set[str] = set()
    for support in plugin.info.model_types:
        defined |= set(_classes_of(support.model_type))
    declared = [*plugin.experts_classes, *plugin.layout_overrides, *plugin.dense_classes, *plugin.parallel_classes]
    return sorted(name for name in set(declared) if name not in defined)


def generic_takeovers(plugin: Any) -> dict[str, str]:
    """Model type -> why the generic engine handles it on the installed transformers, for the
    types of ``plugin`` (a :class:`defuser.family.Family`; other plugins say nothing here) that
    exist in it.  Imports the modeling modules of those types."""
    from defuser.engine.contract import decorated_class
    from defuser.family import Family

    if not isinstance(plugin, Family):
        return {}
    declared = {
        *plugin.experts_classes,
        *plugin.layout_overrides,
        *plugin.dense_classes,
        *plugin.parallel_classes,
    }
    found: dict[str, str] = {}
    for support in plugin.info.model_types:
        classes = _classes_of(support.model_type)
        if not classes:
            continue  # the type does not exist in this release
        decorated_now = sorted(
            name for name in plugin.experts_classes if name in classes and decorated_class(classes[name])
        )
        in_use = [name for name in declared if name in classes and name not in decorated_now]
        if decorated_now:
            found[support.model_type] = f"{', '.join(decorated_now)} decorated now: its flags replace the declaration"
        elif not in_use and any(decorated_class(cls) is not None for cls in classes.values()):
            found[support.model_type] = "decorated experts, read from their flags (no declaration)"
    return found
