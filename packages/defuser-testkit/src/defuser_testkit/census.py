"""The census: every fused structure in the installed transformers, found at test time.

:func:`scan_fused_classes` reads the source of every ``models/*/modeling_*.py`` (no import)
and reports the classes that hold fused weights: experts decorated with
``@use_experts_implementation``, classes assigning ``self.gate_up_proj = nn.Linear(...)``,
and undecorated ``*Expert*`` classes creating their own ``nn.Parameter`` (stacked or
flattened expert weights).  Classes are matched on the class hierarchy, not on names alone: a
class deriving from a fused class is fused too (``base`` names the fused class it derives
from; ergo's ``ErgoExperts`` derives from the decorated ``ErgoExpertProjections`` and is the
one its model builds), and :func:`built_or_derived` says whether a fused class is built
itself or through such a subclass.  :func:`fused_model_types` maps them to the model types
whose models contain them, including composites whose sub-configs are such types.  Nothing
here is a frozen list, so a class transformers adds or renames shows up by name.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FusedClass", "built_or_derived", "fused_model_type_names", "fused_model_types", "scan_fused_classes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedClass:
    """A class holding fused weights: where it lives and which kind it is."""

    package: str  # the transformers.models sub-package, e.g. "qwen3_moe"
    name: str
    kind: str  # "decorated_experts" | "undecorated_experts" | "fused_dense_mlp"
    base: str | None = None  # the fused class it derives from (its kind is that class's), if any


def _is_decorated(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name) and target.id == "use_experts_implementation":
            return True
    return False


def _init_assignments(node: ast.ClassDef) -> list[tuple[str, ast.expr]]:
    found = []
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            for statement in ast.walk(item):
                if isinstance(statement, ast.Assign):
                    for target in statement.targets:
                        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                            found.append((target.attr, statement.value))
    return found


def _call_name(value: ast.expr) -> str:
    if isinstance(value, ast.Call):
        function = value.func
        if isinstance(function, ast.Attribute):
            return function.attr
        if isinstance(function, ast.Name):
            return function.id
    return ""


def _kind_of(node: ast.ClassDef) -> str | None:
    if _is_decorated(node):
        return "decorated_experts"
    assignments = _init_assignments(node)
    if any(name == "gate_up_proj" and _call_name(value) == "Linear" for name, value in assignments):
        return "fused_dense_mlp"
    # A per-expert norm (ergo's ErgoExpertNorm: one scale row per expert) holds no projections.
    if "Expert" in node.name and not node.name.endswith("Norm"):
        if any(_call_name(value) == "Parameter" for _, value in assignments):
            return "undecorated_experts"
    # A mixture-named class stacking weights in 3D (5.3's *NaiveMoe, say): experts by another name.
    if _MIXTURE_NAME.search(node.name) and any(_is_stacked_parameter(value) for _, value in assignments):
        return "undecorated_experts"
    return None


_MIXTURE_NAME = re.compile(r"Moe|MoE|MoA|Mixture")
_TENSOR_FACTORIES = {"empty", "zeros", "ones", "randn", "rand"}


def _is_stacked_parameter(value: ast.expr) -> bool:
    """``nn.Parameter(torch.empty(a, b, c))`` and the like: a parameter of 3 or more dims."""
    if _call_name(value) != "Parameter" or not isinstance(value, ast.Call) or not value.args:
        return False
    factory = value.args[0]
    if not isinstance(factory, ast.Call) or _call_name(factory) not in _TENSOR_FACTORIES:
        return False
    dims = factory.args
    if len(dims) == 1 and isinstance(dims[0], ast.Tuple):
        dims = dims[0].elts
    return len(dims) >= 3


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):
            names.append(base.attr)
    return names


def _may_define_fused(source: str) -> bool:
    """False only when no class of ``source`` can be one :func:`_kind_of` reports: each kind
    needs the decorator's name, ``gate_up_proj``, or ``Parameter`` with an experts-like name."""
    if "use_experts_implementation" in source or "gate_up_proj" in source:
        return True
    return "Parameter" in source and ("Expert" in source or _MIXTURE_NAME.search(source) is not None)


# A top-level class statement: its name and its parenthesised bases (one level of nesting).
_CLASS_HEADER = re.compile(r"^class\s+(\w+)\s*(?:\(((?:[^()]|\([^()]*\))*)\))?\s*:", re.MULTILINE)
_BASE = re.compile(r"\s*(?:\w+\s*\.\s*)*(\w+)\s*")
_CLASS_LINE = re.compile(r"^class\b", re.MULTILINE)


def _class_headers(source: str) -> list[tuple[str, list[str]]] | None:
    """``(name, base names)`` of each top-level class, as :func:`_base_names` gives them (a
    dotted base by its last name; keywords and subscripted or called bases left out), or None
    when a line opening a class is one the pattern cannot read (the file is parsed instead)."""
    headers = []
    for match in _CLASS_HEADER.finditer(source):
        names = []
        for base in (match.group(2) or "").split(","):
            plain = _BASE.fullmatch(base)
            if plain is not None:
                names.append(plain.group(1))
        headers.append((match.group(1), names))
    if len(headers) != len(_CLASS_LINE.findall(source)):
        return None
    return headers


@functools.lru_cache(maxsize=1)
def _scan() -> tuple[tuple[FusedClass, ...], dict[str, str]]:
    import transformers

    models = Path(transformers.__file__).parent / "models"
    found: dict[tuple[str, str], FusedClass] = {}
    defined_in: dict[str, str] = {}
    bases: dict[tuple[str, str], list[str]] = {}
    for path in sorted(models.glob("*/modeling_*.py")):
        package = path.parent.name
        source = path.read_text(encoding="utf-8")
        headers = None if _may_define_fused(source) else _class_headers(source)
        if headers is not None:
            # Parsing is most of the scan's time: a file that cannot hold a fused class only
            # needs its top-level class names and bases, which its class headers give.
            for name, names in headers:
                defined_in.setdefault(name, package)
                bases[(package, name)] = names
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                defined_in.setdefault(node.name, package)
                bases[(package, node.name)] = _base_names(node)
                kind = _kind_of(node)
                if kind is not None:
                    found[(package, node.name)] = FusedClass(package, node.name, kind)
    # Derived classes, transitively: a base resolves to its own module's class first, else to
    # the module that defines that name.
    changed = True
    while changed:
        changed = False
        for (package, name), names in bases.items():
            if (package, name) in found:
                continue
            for base in names:
                fused = found.get((package, base)) or found.get((defined_in.get(base, ""), base))
                if fused is not None:
                    found[(package, name)] = FusedClass(package, name, fused.kind, base=fused.name)
                    changed = True
                    break
    return tuple(found.values()), defined_in


def scan_fused_classes() -> list[FusedClass]:
    """Every class with fused weights in the installed transformers' modeling files, classes
    deriving from one included."""
    return list(_scan()[0])


def built_or_derived(fused: FusedClass, built: set[str], classes: list[FusedClass]) -> bool:
    """True when a model builds ``fused`` (its name is in ``built``) or a class of ``classes``
    deriving from it, at any depth."""
    if fused.name in built:
        return True
    return any(
        other.base == fused.name and other.name != fused.name and built_or_derived(other, built, classes)
        for other in classes
    )


def _model_packages(model_type: str, config_class: type) -> set[str]:
    # A model type may reuse another family's model classes (sarvam_mla -> DeepseekV3ForCausalLM).
    from transformers.models.auto import modeling_auto

    defined_in = _scan()[1]
    packages = {_package_of(config_class)}
    for mapping in (modeling_auto.MODEL_MAPPING_NAMES, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        names = mapping.get(model_type, ())
        for name in (names,) if isinstance(names, str) else names:
            if name in defined_in:
                packages.add(defined_in[name])
    return packages


def _package_of(config_class: type) -> str:
    return config_class.__module__.split(".")[2]


def _sub_config_types(config: object, seen: set[int]) -> set[str]:
    if id(config) in seen:
        return set()
    seen.add(id(config))
    types = {str(getattr(config, "model_type", ""))}
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            types |= _sub_config_types(value, seen)
    return types


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    # Some default configs name a hub backbone; the census never downloads.
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def fused_model_types(classes: list[FusedClass] | None = None) -> dict[str, set[FusedClass]]:
    """Model type -> the fused classes its modeling package (or a sub-config's) defines."""
    with _offline():
        return _fused_model_types(classes)


def _fused_model_types(classes: list[FusedClass] | None) -> dict[str, set[FusedClass]]:
    from transformers import CONFIG_MAPPING

    by_package: dict[str, set[FusedClass]] = defaultdict(set)
    for fused in scan_fused_classes() if classes is None else classes:
        by_package[fused.package].add(fused)
    result: dict[str, set[FusedClass]] = {}
    for model_type in CONFIG_MAPPING.keys():
        try:
            config_class = CONFIG_MAPPING[model_type]
        except Exception:  # an entry whose module cannot be imported here
            continue
        own = {fused for package in _model_packages(model_type, config_class) for fused in by_package.get(package, ())}
        nested: set[FusedClass] = set()
        if not getattr(config_class, "sub_configs", None):  # no composite: nothing nested to find
            if own:
                result[model_type] = own
            continue
        try:
            config = config_class()
            for sub_type in _sub_config_types(config, set()) - {model_type}:
                if sub_type in CONFIG_MAPPING:
                    nested |= by_package.get(_package_of(CONFIG_MAPPING[sub_type]), set())
        except Exception as error:  # a default config that cannot be instantiated as shipped
            logger.debug("default config of %s: %s", model_type, error)
        if own or nested:
            result[model_type] = own | nested
    return result


def modeling_module(fused: FusedClass) -> object:
    """The imported modeling module that defines ``fused``."""
    return importlib.import_module(f"transformers.models.{fused.package}.modeling_{fused.package}")


def fused_model_type_names(cache_dir: Path) -> list[str]:
    """The sorted keys of :func:`fused_model_types`, kept in a JSON file under ``cache_dir``.

    The scan parses every modeling file and imports every configuration module (tens of
    seconds); a test suite only needs the names to parametrize over at collection.  The file
    is named by the installed transformers (version, location, and the name, size and mtime of
    every modeling and configuration file) and by this module's source, so another release, an
    edited transformers or a changed scanner gets a scan of its own; it is never reused
    across them.
    """
    path = cache_dir / f"fused-model-types-{_scan_key()}.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            return names
        logger.warning("ignoring malformed census cache %s", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable census cache %s: %s", path, error)
    names = sorted(fused_model_types())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a run stopped half-way leaves no truncated list behind.
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(names), encoding="utf-8")
        partial.replace(path)
    except OSError as error:  # a read-only checkout: scan again next time
        logger.warning("cannot write the census cache %s: %s", path, error)
    return names


def _scan_key() -> str:
    """What the scan's answer depends on: the installed transformers' sources and this module."""
    import transformers

    package = Path(transformers.__file__).parent
    digest = hashlib.sha256()
    digest.update(f"{transformers.__version__}\0{package}\0".encode())
    digest.update(Path(__file__).read_bytes())
    for source in sorted([*package.glob("models/*/modeling_*.py"), *package.glob("models/*/configuration_*.py")]):
        stat = source.stat()
        digest.update(f"{source.relative_to(package)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return f"{transformers.__version__}-{digest.hexdigest()[:16]}"
