"""The plugin manager: finds plugins through entry points, lazily, and tolerates broken ones.

Plugins are published under the entry-point group :data:`ENTRY_POINT_GROUP` (``defuser``)::

    [project.entry-points.defuser]
    qwen = "defuser_qwen.hooks:plugin"

Nothing is imported at ``import defuser``; the first conversion or patch loads the plugins.
Which load is decided, by entry-point name, by the environment (or :func:`configure`):

* ``DEFUSER_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry point (register plugins by hand);
* ``DEFUSER_LOAD_PLUGINS=qwen,glm``: load only these (set but empty: none);
* ``DEFUSER_DISABLED_PLUGINS=mixtral``: never load these.

A plugin that fails to import, describes itself wrongly, or supports neither the installed
transformers nor this core is skipped with a warning naming it (``strict=True`` re-raises).
The ``transformers`` and ``defuser-core`` requirements of an entry point's distribution are
checked before it is imported (a plugin outside them is never imported); the ranges its
:class:`PluginInfo` states are checked for what its distribution does not say (a plugin
registered by hand has none).  A hook implementation that matches no hookspec (a misspelt
name) and a method named like a hook without ``@hookimpl`` (pluggy would never call it) make
the plugin fail to load, naming both.
When two plugins claim one model type, the higher ``priority`` wins, then the smaller name;
a warning names both.

A hook that raises is reported as :class:`PluginError` naming the plugin and the hook:

* ``defuser_detect_candidate``: a :class:`~defuser.errors.DeclarationError` (a declaration
  that does not fit the module: a tensor or activation name it lacks) refuses the module
  (``convert_model`` raises ``ConversionError`` naming plugin, class and field before changing
  anything).  Otherwise, when the plugin owns the module's model type, its declaration
  is taken not to fit the installed transformers: the generic engine defuses the module if it
  can (self-checked), with one warning naming plugin, version and reason; a fused module it
  cannot take is refused (``convert_model`` raises ``ConversionError`` before changing
  anything); any other module is left as it is, with a warning (once per plugin and hook).
  A plugin that does not own the module's model type is skipped and the next one asked, as
  if it had returned None.  ``strict=True`` raises instead.
* ``defuser_preload_plan``: raised; ``replace_fused_blocks`` patches nothing.
* ``defuser_defuse_candidate``: raised; ``convert_model`` restores the module and raises
  ``ConversionError`` with its path (modules converted before stay converted).
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier
from packaging.utils import canonicalize_name
from torch import nn

from defuser import hookspecs
from defuser.compat import transformers_version, version_in
from defuser.engine.candidates import Candidate, ExpertsLayout
from defuser.engine.contract import looks_fused
from defuser.engine.generic import GENERIC_PLUGIN_NAME, GenericEngine
from defuser.engine.preload import PreloadPlan
from defuser.errors import DeclarationError, DeclarationMismatch, PluginError
from defuser.plugin_info import PluginInfo

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_DISABLED_PLUGINS",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_LOAD_PLUGINS",
    "DefuserPluginManager",
    "LoadedPlugin",
    "PluginError",
    "configure",
    "get_plugin_manager",
    "list_plugins",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "defuser"
ENV_DISABLE_AUTOLOAD = "DEFUSER_DISABLE_PLUGIN_AUTOLOAD"
ENV_LOAD_PLUGINS = "DEFUSER_LOAD_PLUGINS"
ENV_DISABLED_PLUGINS = "DEFUSER_DISABLED_PLUGINS"


@dataclass
class LoadedPlugin:
    """A plugin the manager knows about (loaded or not)."""

    name: str
    info: PluginInfo | None = None
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    obj: Any = field(default=None, repr=False)
    # Names of the hooks the plugin implements (empty until it registered).
    hooks: tuple[str, ...] = ()


def _names_from_env(variable: str) -> set[str] | None:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _implementing_plugin(error: BaseException, caller: Any) -> str | None:
    """Name of the plugin whose hook implementation raised ``error`` (from its traceback).

    Plugins built on one class (every :class:`defuser.family.Family`) share code objects, so
    a frame matches an implementation by its code and, for methods, by its ``self``.
    """
    by_code: dict[Any, list[Any]] = {}
    for implementation in caller.get_hookimpls():
        function = getattr(implementation.function, "__func__", implementation.function)
        code = getattr(function, "__code__", None)
        if code is not None:
            by_code.setdefault(code, []).append(implementation)
    trace = error.__traceback__
    while trace is not None:
        matches = by_code.get(trace.tb_frame.f_code)
        if matches:
            if len(matches) == 1:
                return matches[0].plugin_name
            instance = trace.tb_frame.f_locals.get("self")
            for implementation in matches:
                if getattr(implementation.function, "__self__", None) is instance:
                    return implementation.plugin_name
        trace = trace.tb_next
    return None


# The packages whose installed release a plugin's requirements are checked against.
_CHECKED_PACKAGES = ("transformers", "defuser-core")


def _installed_release(package: str) -> Any:
    return transformers_version() if package == "transformers" else _core_version()


def _range_refusal(name: str, package: str, wanted: str) -> str | None:
    """Why plugin ``name`` cannot load with ``package`` installed as it is (None: it can)."""
    found = _installed_release(package)
    try:
        supported = version_in(wanted, found)
    except InvalidSpecifier:
        return f"plugin {name!r} declares an invalid {package} range {wanted!r}"
    if supported:
        return None
    installed = f"{package} {found} is installed" if found else f"{package} is not installed"
    return f"plugin {name!r} requires {package}{wanted}, but {installed}"


def _distribution_requirements(entry_point: Any) -> dict[str, str]:
    """The ``transformers`` and ``defuser-core`` ranges the entry point's distribution requires
    (read from its metadata, without importing it); requirements of extras are left out."""
    dist = getattr(entry_point, "dist", None)
    ranges: dict[str, str] = {}
    for line in (getattr(dist, "requires", None) or []) if dist is not None else []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # not ours to judge; the installer accepted it
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        package = canonicalize_name(requirement.name)
        if package in _CHECKED_PACKAGES and str(requirement.specifier):
            # Several lines for one package (under different markers) all hold.
            ranges[package] = ",".join(filter(None, (ranges.get(package), str(requirement.specifier))))
    return ranges


def _core_version() -> str:
    try:
        return version("defuser-core")
    except PackageNotFoundError:  # running from a source tree
        from defuser import __version__

        return __version__


class DefuserPluginManager:
    """Loads plugins and answers the three hooks on behalf of core."""

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        allow: set[str] | list[str] | None = None,
        block: set[str] | list[str] | None = None,
        strict: bool = False,
    ):
        self.autoload = autoload if autoload is not None else os.environ.get(ENV_DISABLE_AUTOLOAD, "") in ("", "0")
        self.allow = set(allow) if allow is not None else _names_from_env(ENV_LOAD_PLUGINS)
        self.block = set(block) if block is not None else (_names_from_env(ENV_DISABLED_PLUGINS) or set())
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, LoadedPlugin] = {}
        self._owners: dict[str | None, str | None] = {}
        # Hook callers by (hook, model type, skipped plugins): detection asks one per module.
        self._callers: dict[tuple[str, str | None, frozenset[str]], Any] = {}
        # class name -> plugins declaring it (built on first use, reset with the owners)
        self._declared: dict[str, set[str]] | None = None
        self._reported: set[tuple[str, str]] = set()
        self._registered_models: list[str] | None = None
        self._loaded = False
        self._lock = threading.RLock()
        self._register_object(GenericEngine(), GENERIC_PLUGIN_NAME, distribution="defuser-core")

    # -- loading ------------------------------------------------------------------------

    def ensure_loaded(self) -> None:
        """Load the entry-point plugins once (no-op when autoload is off)."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if not self.autoload:
                return
            for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
                if entry_point.name in self.block or (self.allow is not None and entry_point.name not in self.allow):
                    logger.debug("plugin %s not loaded (by configuration)", entry_point.name)
                    continue
                distribution = getattr(entry_point.dist, "name", None)
                required = _distribution_requirements(entry_point)
                refusals = [_range_refusal(entry_point.name, package, wanted) for package, wanted in required.items()]
                refusal = next((message for message in refusals if message), None)
                if refusal is not None:  # never imported
                    self._fail(entry_point.name, refusal, distribution)
                    continue
                try:
                    obj = entry_point.load()
                except Exception as error:
                    self._fail(
                        entry_point.name,
                        f"plugin {entry_point.name!r}: import of {entry_point.value} failed: {_describe_error(error)}",
                        distribution,
                    )
                    continue
                self._register_object(obj, entry_point.name, distribution=distribution, checked=frozenset(required))

    def register(self, plugin: Any, name: str | None = None) -> LoadedPlugin:
        """Register a plugin object or module by hand (tests, notebooks, private plugins)."""
        with self._lock:
            fallback: str = getattr(plugin, "__name__", type(plugin).__name__)
            return self._register_object(plugin, name or fallback)

    def unregister(self, name: str) -> None:
        """Forget the plugin registered under ``name``."""
        with self._lock:
            loaded = self.plugins.pop(name, None)
            if loaded is not None and loaded.obj is not None:
                self.pm.unregister(loaded.obj)
            self._owners.clear()
            self._callers.clear()
            self._declared = None

    def _fail(self, name: str, message: str, distribution: str | None = None) -> LoadedPlugin:
        failed = LoadedPlugin(name=name, distribution=distribution, error=message)
        self.plugins[name] = failed
        logger.warning("defuser plugin skipped: %s", message)
        if self.strict:
            raise PluginError(message)
        return failed

    def _register_object(
        self, obj: Any, name: str, distribution: str | None = None, checked: frozenset[str] = frozenset()
    ) -> LoadedPlugin:
        """Register ``obj`` as plugin ``name``; ``checked``: the packages whose ranges its
        distribution's metadata already satisfied (its info's ranges are checked for the rest)."""
        dist_version = None
        if distribution:
            try:
                dist_version = version(distribution)
            except PackageNotFoundError:
                dist_version = None
        try:
            describe = getattr(obj, "defuser_plugin_info", None)
            info = describe() if callable(describe) else PluginInfo(name=name)
            if not isinstance(info, PluginInfo):
                raise TypeError(f"defuser_plugin_info returned {type(info).__name__}, expected PluginInfo")
        except Exception as error:
            return self._fail(
                name, f"plugin {name!r}: hook defuser_plugin_info raised {_describe_error(error)}", distribution
            )
        for package, wanted in (("transformers", info.transformers), ("defuser-core", info.core)):
            refusal = None if package in checked else _range_refusal(name, package, wanted)
            if refusal is not None:
                return self._fail(name, refusal, distribution)
        unmarked = self._unmarked_hooks(obj, name)
        if unmarked:
            return self._fail(name, unmarked, distribution)
        try:
            self.pm.register(obj, name=name)
        except Exception as error:
            return self._fail(name, f"plugin {name!r}: registration failed: {_describe_error(error)}", distribution)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            unknown = self._unknown_hooks(obj)
            if unknown:  # else another plugin's, which was refused when it registered
                self.pm.unregister(obj)
                return self._fail(name, self._unknown_hook_message(name, unknown), distribution)
        hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(obj) or ()))
        loaded = LoadedPlugin(name, info, distribution, dist_version, obj=obj, hooks=hooks)
        self.plugins[name] = loaded
        self._owners.clear()
        self._callers.clear()
        self._declared = None
        return loaded

    def _spec_names(self) -> list[str]:
        return sorted(
            name for name, caller in vars(self.pm.hook).items() if not name.startswith("_") and caller.has_spec()
        )

    def _unknown_hooks(self, obj: Any) -> list[str]:
        """Hooks ``obj`` implements (``@hookimpl``, not optional) that no hookspec defines."""
        return sorted(
            caller.name
            for caller in self.pm.get_hookcallers(obj) or ()
            if not caller.has_spec()
            and any(impl.plugin is obj and not impl.optionalhook for impl in caller.get_hookimpls())
        )

    def _unknown_hook_message(self, name: str, unknown: list[str]) -> str:
        parts = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, self._spec_names(), n=1)
            parts.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"plugin {name!r}: hook implementation {', '.join(parts)} matches no defuser hookspec"

    def _unmarked_hooks(self, obj: Any, name: str) -> str | None:
        """Why ``obj`` would silently lose a hook: a method named like a hookspec (or nearly so)
        without ``@hookimpl`` marker, which pluggy never calls (e.g. a :class:`Family` subclass
        overriding a hook without re-applying the decorator).  None when there is none."""
        specs = self._spec_names()
        for attribute in sorted(dir(obj)):
            if not attribute.startswith(f"{hookspecs.PROJECT_NAME}_"):
                continue
            try:
                value = getattr(obj, attribute)
            except Exception:  # a property that raises: not a hook
                continue
            if not callable(value) or self.pm.parse_hookimpl_opts(obj, attribute) is not None:
                continue
            close = difflib.get_close_matches(attribute, specs, n=1, cutoff=0.85)
            if not close:
                continue
            owner = getattr(getattr(value, "__func__", value), "__qualname__", attribute)
            like = f"the hook {attribute!r}" if close[0] == attribute else f"the hook {close[0]!r} (misspelt?)"
            return (
                f"plugin {name!r}: {owner} is named like {like} but has no @hookimpl, "
                "so it would never be called (decorate it with defuser.plugin.hookimpl)"
            )
        return None

    # -- ownership ----------------------------------------------------------------------

    def owner_of(self, model_type: str | None) -> str | None:
        """Name of the plugin that handles ``model_type`` (None: nobody claims it)."""
        self.ensure_loaded()
        with self._lock:
            if model_type in self._owners:
                return self._owners[model_type]
            claimants = sorted(
                (p for p in self.plugins.values() if p.info is not None and p.info.claims(model_type)),
                key=lambda p: (-p.info.priority, p.name),  # type: ignore[union-attr]  # info: filtered above
            )
            owner = claimants[0].name if claimants else None
            if len(claimants) > 1:
                others = ", ".join(p.name for p in claimants[1:])
                logger.warning("model type %r is claimed by %s and %s; using %s", model_type, owner, others, owner)
            self._owners[model_type] = owner
            return owner

    def _caller(self, hook_name: str, model_type: str | None, skipped: frozenset[str] = frozenset()) -> Any:
        key = (hook_name, model_type, skipped)
        caller = self._callers.get(key)
        if caller is None:
            caller = self._callers[key] = self._new_caller(hook_name, model_type, skipped)
        return caller

    def _new_caller(self, hook_name: str, model_type: str | None, skipped: frozenset[str]) -> Any:
        owner = self.owner_of(model_type)
        removed = [
            p.obj
            for p in self.plugins.values()
            if p.obj is not None
            and (p.name in skipped or (p.name != GENERIC_PLUGIN_NAME and owner is not None and p.name != owner))
        ]
        if not removed:
            return getattr(self.pm.hook, hook_name)
        return self.pm.subset_hook_caller(hook_name, remove_plugins=removed)

    def _hook_error(self, hook_name: str, error: Exception, caller: Any, context: str) -> tuple[str, PluginError]:
        """The plugin whose ``hook_name`` raised ``error``, and a :class:`PluginError` naming both."""
        culprit = _implementing_plugin(error, caller)
        if culprit is None:  # raised by pluggy itself (a bad signature), not inside a hook
            names = sorted(implementation.plugin_name for implementation in caller.get_hookimpls())
            culprit = " or ".join(names) or "?"
        message = f"plugin {culprit!r}: hook {hook_name} raised {_describe_error(error)}"
        if context:
            message += f" ({context})"
        return culprit, PluginError(message)

    def _warn_once(self, culprit: str, hook_name: str, message: str) -> None:
        key = (culprit, hook_name)
        level = logging.DEBUG if key in self._reported else logging.WARNING
        self._reported.add(key)
        logger.log(level, "%s", message)

    # -- the three jobs -----------------------------------------------------------------

    def detect(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        """Detection: the candidate for one module, from its model type's plugin or generic.

        A raising implementation never aborts the walk (unless ``strict``): a plugin that does
        not own ``model_type`` is skipped as if it had answered None.  When the owner raises (its
        declaration does not fit the installed transformers: a class it declares is decorated
        now, an attribute it reads is gone), the generic engine takes the module if it can
        (self-checked like any other), with one warning naming the plugin, its version and the
        reason; a fused module it cannot take is refused with that reason
        (``convert_model`` raises before changing anything); any other module is left as it is.
        When core's generic engine raises, the module is left fused.  A warning names the
        plugin and the hook.
        """
        self.ensure_loaded()
        found = self._detect(module, path, model_type)
        if found is None and self.owner_of(model_type) is not None:
            # A class a plugin declares is its own wherever it sits (a wrapper or sub-model of
            # another type): asked as if no type enclosed it.
            declaring = self._declaring_plugins(type(module).__name__)
            if declaring - {self.owner_of(model_type)}:
                found = self._detect(module, path, None)
        return found

    def _declaring_plugins(self, class_name: str) -> set[str]:
        """Plugins whose declarations (``Family.declared_classes``) name ``class_name``."""
        with self._lock:
            if self._declared is None:
                self._declared = {}
                for plugin in self.plugins.values():
                    for name in getattr(plugin.obj, "declared_classes", None) or ():
                        self._declared.setdefault(name, set()).add(plugin.name)
            return self._declared.get(class_name, set())

    def _detect(self, module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
        hook_name = "defuser_detect_candidate"
        owner = self.owner_of(model_type)
        skipped: set[str] = set()
        while True:
            caller = self._caller(hook_name, model_type, frozenset(skipped))
            try:
                return caller(module=module, path=path, model_type=model_type)
            except Exception as error:
                context = f"on {path} ({type(module).__name__}, model type {model_type!r})"
                culprit, failure = self._hook_error(hook_name, error, caller, context)
                if self.strict:
                    raise failure from error
                if isinstance(error, DeclarationError):
                    # The plugin's own mistake, not a change in transformers: refused, never guessed.
                    self._warn_once(culprit, f"{hook_name}:{type(module).__name__}", f"{failure}; module refused")
                    return Candidate(
                        path, module, "experts", culprit, ExpertsLayout(num_experts=0), model_type, refusal=str(error)
                    )
                if culprit in self.plugins and culprit not in (owner, GENERIC_PLUGIN_NAME) and culprit not in skipped:
                    self._warn_once(culprit, hook_name, f"{failure}; plugin skipped for such modules")
                    skipped.add(culprit)
                    continue
                if culprit == owner and culprit in self.plugins:
                    return self._fall_back(module, path, model_type, culprit, error, failure)
                self._warn_once(culprit, hook_name, f"{failure}; module left fused")
                return None

    def _fall_back(
        self, module: nn.Module, path: str, model_type: str | None, plugin: str, error: Exception, failure: PluginError
    ) -> Candidate | None:
        """The generic engine's answer for a module whose owner ``plugin`` raised ``error``
        (see :meth:`detect`), or a refusal naming both."""
        loaded = self.plugins[plugin]
        installed = transformers_version()
        who = f"plugin {plugin!r} {loaded.version or '(no version)'}"
        reason = _describe_error(error)
        generic = self.plugins[GENERIC_PLUGIN_NAME].obj
        try:
            candidate = generic.defuser_detect_candidate(module=module, path=path, model_type=model_type)
        except Exception:  # the generic engine cannot read it either
            candidate = None
        key = (plugin, f"fallback:{type(module).__name__}")
        if candidate is not None and not candidate.refusal:
            # Expected where the plugin was tested on this release (a class it once declared
            # undecorated is decorated now); news otherwise.
            expected = (
                isinstance(error, DeclarationMismatch)
                and loaded.info is not None
                and loaded.info.tested_with(installed)
            )
            level = logging.INFO if expected else logging.WARNING
            level = level if key not in self._reported else logging.DEBUG
            self._reported.add(key)
            logger.log(
                level,
                "%s does not fit transformers %s on %s (%s): hook defuser_detect_candidate raised %s; "
                "the generic engine defuses it (self-checked)",
                who,
                installed,
                path,
                type(module).__name__,
                reason,
            )
            candidate.extra["fallback_from"] = plugin
            return candidate
        if candidate is None and not looks_fused(module):
            self._warn_once(plugin, "defuser_detect_candidate", f"{failure}; module left fused")
            return None
        beyond = (
            f"and the generic engine cannot defuse it either: {candidate.refusal}"
            if candidate is not None
            else "and the generic engine does not know this structure"
        )
        layout = candidate.layout if candidate is not None else ExpertsLayout(num_experts=0)
        refusal = f"{who} does not fit transformers {installed} ({reason}), {beyond}"
        return Candidate(path, module, "experts", plugin, layout, model_type, refusal=refusal)

    def preload_plan(self, model_type: str) -> PreloadPlan | None:
        """Pre-load patching: the owner plugin's plan for ``model_type`` (the generic engine's for
        a type no plugin claims); a raising hook is a :class:`PluginError` naming plugin and hook."""
        self.ensure_loaded()
        hook_name = "defuser_preload_plan"
        # An owner's answer is final (None included): the generic engine plans unclaimed types only.
        owner = self.owner_of(model_type)
        generic = frozenset({GENERIC_PLUGIN_NAME}) if owner is not None else frozenset()
        caller = self._caller(hook_name, model_type, generic)
        try:
            return caller(model_type=model_type)
        except Exception as error:
            _, failure = self._hook_error(hook_name, error, caller, f"for model type {model_type!r}")
            raise failure from error

    def defuse(self, candidate: Candidate) -> nn.Module:
        """Runtime defusion: the replacement module for ``candidate``; a raising hook is a
        :class:`PluginError` naming plugin and hook (``convert_model`` restores the module and
        adds its path)."""
        self.ensure_loaded()
        hook_name = "defuser_defuse_candidate"
        # A module the owner could not describe (it fell back to the generic engine) is not its own.
        fallen = candidate.extra.get("fallback_from")
        caller = self._caller(hook_name, candidate.model_type, frozenset({fallen} if fallen else ()))
        try:
            result = caller(candidate=candidate)
        except Exception as error:
            _, failure = self._hook_error(hook_name, error, caller, "")
            raise failure from error
        if result is None:
            raise PluginError(f"no plugin could defuse {candidate.path} ({candidate.class_name})")
        return result

    def patch_model(self, model: nn.Module, model_type: str) -> list[str]:
        """Runtime patches of the owner of ``model_type`` for ``model``; a raising hook is a
        :class:`PluginError` naming plugin and hook."""
        self.ensure_loaded()
        hook_name = "defuser_patch_model"
        caller = self._caller(hook_name, model_type)
        try:
            results = caller(model=model, model_type=model_type)
        except Exception as error:
            _, failure = self._hook_error(hook_name, error, caller, f"for model type {model_type!r}")
            raise failure from error
        return [name for result in results if result for name in result]

    def register_models(self) -> list[str]:
        """Let every plugin make its own transformers model classes known (once per manager;
        see ``defuser_register_models``); a raising hook is a :class:`PluginError` naming
        plugin and hook."""
        self.ensure_loaded()
        with self._lock:
            if self._registered_models is None:
                caller = self.pm.hook.defuser_register_models
                try:
                    results = caller()
                except Exception as error:
                    _, failure = self._hook_error("defuser_register_models", error, caller, "")
                    raise failure from error
                self._registered_models = [name for result in results if result for name in result]
            return list(self._registered_models)

    def describe(self) -> list[LoadedPlugin]:
        """All plugins known, loaded or failed, sorted by name."""
        self.ensure_loaded()
        return sorted(self.plugins.values(), key=lambda p: p.name)


_manager: DefuserPluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> DefuserPluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = DefuserPluginManager()
        return _manager


def configure(
    *,
    autoload: bool | None = None,
    allow: list[str] | None = None,
    block: list[str] | None = None,
    strict: bool = False,
) -> DefuserPluginManager:
    """Replace the process-wide manager with one using these choices (same meaning as the
    environment variables; arguments win over them)."""
    global _manager
    with _manager_lock:
        _manager = DefuserPluginManager(autoload=autoload, allow=allow, block=block, strict=strict)
        return _manager


def list_plugins() -> list[LoadedPlugin]:
    """Installed plugins with their info, version and load error (``defuser plugins``)."""
    return get_plugin_manager().describe()
