"""Typed declarations of experts classes, checked where the plugin author is.

``Family(experts_classes=...)`` takes an :class:`ExpertsDecl` per undecorated experts class
and ``Family(layout_overrides=...)`` a :class:`LayoutOverride` per decorated class (the
mapping form ``{"is_concatenated": False}`` is converted).  Unknown fields, values of the
wrong type and impossible combinations raise :class:`~defuser.errors.DeclarationError` when
the family is built, so the plugin fails to load naming plugin, class and field.  Tensor and
activation names can only be checked against a module: :meth:`ExpertsDecl.layout_of` and
:func:`checked_override` do that when a module of the class is detected.

No torch here at import: plugins build these in their cheap ``hooks.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from defuser.engine.candidates import ExpertsLayout, declared_experts_layout, resolve_tensor
from defuser.errors import DeclarationError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ExpertsDecl", "LayoutOverride", "checked_override", "experts_declaration", "layout_override"]

T = TypeVar("T")
# A value, or a function of the fused module giving it (per-instance values, e.g. a count).
PerModule: TypeAlias = T | Callable[["nn.Module"], T]


@dataclass(frozen=True)
class ExpertsDecl:
    """How an undecorated experts class stores its experts: the :class:`ExpertsLayout` fields
    (see there) but the expert count, which is read from the tensors.  A callable value is
    called with the module when it is detected."""

    has_gate: PerModule[bool] = True
    has_bias: PerModule[bool] = False
    is_transposed: PerModule[bool] = False
    is_concatenated: PerModule[bool] = True
    gate_first: PerModule[bool] = True
    has_post_expert_norm: PerModule[bool] = False
    post_expert_norm_by_expert: PerModule[bool] = False
    gate_up_name: PerModule[str] = "gate_up_proj"
    gate_name: PerModule[str] = "gate_proj"
    up_name: PerModule[str] = "up_proj"
    down_name: PerModule[str] = "down_proj"
    separate_gate_up: PerModule[bool] = False
    flattened: PerModule[bool] = False
    down_transposed: PerModule[bool | None] = None
    identity_experts: PerModule[int] = 0
    contract: PerModule[Literal["routed", "expert_major", "weighted_all"]] = "routed"
    activation: PerModule[str] = "act_fn"
    gate_style: PerModule[Literal["default", "module"]] = "default"

    def __post_init__(self) -> None:
        static = {}
        for name, value in self.changes().items():
            if not callable(value):
                _check_type(name, value)
                static[name] = value
        ExpertsLayout(num_experts=0, **static)  # an impossible combination raises ValueError

    def changes(self) -> dict[str, Any]:
        """The fields that differ from their defaults (the mapping form of this declaration)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default or callable(getattr(self, field.name))
        }

    def layout_of(self, module: nn.Module, plugin: str, class_name: str) -> ExpertsLayout | None:
        """The layout of ``module`` this declaration describes; None when its declared tensors
        are all absent (already replaced).  A declared name the module does not have, or a
        per-module value that makes an impossible layout, raises :class:`DeclarationError`."""
        values = {name: value(module) if callable(value) else value for name, value in self.changes().items()}
        where = f"plugin {plugin!r}, class {class_name!r}"
        try:
            for name, value in values.items():
                _check_type(name, value)
            wanted = ExpertsLayout(num_experts=0, **values)
        except ValueError as error:
            raise DeclarationError(f"{where}: {error} (values read from the module)") from None
        layout = declared_experts_layout(module, **values)
        _check_tensors(module, layout or wanted, where, absent_is_fine=layout is None)
        if layout is None:
            if not _declared_tensors(wanted, module)[1]:  # every declared tensor is gone: not ours now
                return None
            raise DeclarationError(f"{where}: {_shape_problem(module, wanted)}")
        _check_activation(module, layout, where)
        _check_shapes(module, layout, where)
        return layout


@dataclass(frozen=True)
class LayoutOverride:
    """Quirks of a decorated experts class that its decorator's flags do not say: each field
    set (not None) replaces the :class:`ExpertsLayout` field read from the flags."""

    has_gate: bool | None = None
    has_bias: bool | None = None
    is_transposed: bool | None = None
    is_concatenated: bool | None = None
    gate_first: bool | None = None
    has_post_expert_norm: bool | None = None
    post_expert_norm_by_expert: bool | None = None
    gate_up_name: str | None = None
    gate_name: str | None = None
    up_name: str | None = None
    down_name: str | None = None
    separate_gate_up: bool | None = None
    flattened: bool | None = None
    down_transposed: bool | None = None
    identity_experts: int | None = None
    contract: Literal["routed", "expert_major", "weighted_all"] | None = None
    activation: str | None = None
    gate_style: Literal["default", "module"] | None = None

    def __post_init__(self) -> None:
        if not self.changes():
            raise ValueError("an override that sets no field changes nothing")
        for name, value in self.changes().items():
            _check_type(name, value)

    def changes(self) -> dict[str, Any]:
        """The fields set (the mapping form of this override, as ``with_overrides`` takes it)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }


def experts_declaration(plugin: str, class_name: str, value: ExpertsDecl | Mapping[str, Any]) -> ExpertsDecl:
    """``value`` as a checked :class:`ExpertsDecl` (a mapping is converted); a wrong one raises
    :class:`DeclarationError` naming ``plugin``, ``class_name`` and the field."""
    return _declaration(ExpertsDecl, plugin, class_name, value)


def layout_override(plugin: str, class_name: str, value: LayoutOverride | Mapping[str, Any]) -> LayoutOverride:
    """``value`` as a checked :class:`LayoutOverride` (a mapping is converted); a wrong one
    raises :class:`DeclarationError` naming ``plugin``, ``class_name`` and the field."""
    return _declaration(LayoutOverride, plugin, class_name, value)


def checked_override(
    module: nn.Module, layout: ExpertsLayout, override: LayoutOverride, plugin: str, class_name: str
) -> ExpertsLayout:
    """``layout`` (read from ``module``'s flags) with ``override`` applied, checked against the
    module: an impossible combination or a name it does not have raises :class:`DeclarationError`."""
    where = f"plugin {plugin!r}, class {class_name!r}"
    try:
        changed = layout.with_overrides(**override.changes())
    except ValueError as error:
        raise DeclarationError(f"{where}: layout_overrides make an impossible layout: {error}") from None
    _check_tensors(module, changed, where, absent_is_fine=False)
    _check_activation(module, changed, where)
    return changed


_D = TypeVar("_D", ExpertsDecl, LayoutOverride)


def _declaration(kind: type[_D], plugin: str, class_name: str, value: _D | Mapping[str, Any]) -> _D:
    where = f"plugin {plugin!r}, class {class_name!r}"
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise DeclarationError(f"{where}: expected a {kind.__name__} or a mapping, got {type(value).__name__}")
    known = [field.name for field in dataclasses.fields(kind)]
    for name in value:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(known)}"
            raise DeclarationError(f"{where}: unknown field {name!r}{hint}")
    try:
        return kind(**value)
    except (TypeError, ValueError) as error:
        raise DeclarationError(f"{where}: {error}") from None


def _check_type(name: str, value: Any) -> None:
    """Raise ValueError when ``value`` does not fit :class:`ExpertsLayout`'s field ``name``."""
    hint = _LAYOUT_HINTS[name]
    if not _fits(value, hint):
        raise ValueError(f"field {name!r} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is not None and type(None) in typing.get_args(hint):  # X | None
        return value is None or any(_fits(value, arg) for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and bool(value)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if args:
        return " or ".join(_describe(arg) for arg in args) + " or None"
    return {bool: "True or False", int: "a whole number", str: "a non-empty name"}.get(hint, str(hint))


def _layout_hints() -> dict[str, Any]:
    hints = typing.get_type_hints(ExpertsLayout)
    hints.pop("num_experts")
    return hints


_LAYOUT_HINTS = _layout_hints()


# -- checks against a module -------------------------------------------------------------


def _declared_tensors(layout: ExpertsLayout, module: nn.Module) -> tuple[dict[str, str], list[str]]:
    """``layout``'s fused tensor names -> the field that names each, and those ``module`` has."""
    first_field = "gate_name" if layout.separate_gate_up else ("gate_up_name" if layout.has_gate else "up_name")
    fields = {layout.first_name: first_field, layout.down_name: "down_name"}
    if layout.separate_gate_up:
        fields[layout.up_name] = "up_name"
    if layout.has_bias:
        fields.update({f"{layout.first_name}_bias": "has_bias", f"{layout.down_name}_bias": "has_bias"})
    present = [name for name in fields if resolve_tensor(module, name) is not None]
    return fields, present


def _tensor_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]


def _check_tensors(module: nn.Module, layout: ExpertsLayout, where: str, absent_is_fine: bool) -> None:
    """Raise :class:`DeclarationError` naming the field whose tensor ``module`` lacks.  With
    ``absent_is_fine``, a module lacking every declared tensor passes when none of its tensors
    looks like one (already replaced, e.g. by a quantizer's own tensors named after them)."""
    fields, present = _declared_tensors(layout, module)
    missing = [name for name in fields if name not in present]
    if not missing:
        return
    existing = _tensor_names(module)
    if absent_is_fine and not present:
        if not existing or any(name.startswith(tuple(fields)) for name in existing):
            return
    name = missing[0]
    field = fields[name]
    close = difflib.get_close_matches(name, existing, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(existing[:12]) + (" ..." if len(existing) > 12 else "") if existing else "none"
    what = "has_bias=True, but" if field == "has_bias" else f"field {field!r} names tensor {name!r}, but"
    raise DeclarationError(f"{where}: {what} the module has no tensor {name!r}{hint}; its tensors: {listed}")


def _shape_problem(module: nn.Module, layout: ExpertsLayout) -> str:
    """Why ``declared_experts_layout`` found no experts in tensors that are all there."""
    rank = 2 if layout.flattened else 3
    for name in (layout.first_name, layout.down_name):
        tensor = resolve_tensor(module, name)
        if getattr(tensor, "ndim", 0) != rank:
            shape = tuple(getattr(tensor, "shape", ()))
            return f"tensor {name!r} has shape {shape}, but flattened={layout.flattened} expects {rank} dimensions"
    return "flattened=True needs the module's num_experts (a whole number of 1 or more)"


def _check_activation(module: nn.Module, layout: ExpertsLayout, where: str) -> None:
    if layout.has_gate and layout.gate_style == "module":
        return  # the class's own _apply_gate combines gate and up: it may need no activation attribute
    found: Any = module
    for part in layout.activation.split("."):
        found = getattr(found, part, None)
    if callable(found):
        return
    children = [name for name, _ in module.named_modules() if name]
    close = difflib.get_close_matches(layout.activation, children, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(children[:12]) or "none"
    raise DeclarationError(
        f"{where}: field 'activation' names {layout.activation!r}, which is not a callable attribute of the "
        f"module{hint}; its submodules: {listed}"
    )


def _check_shapes(module: nn.Module, layout: ExpertsLayout, where: str) -> None:
    """Raise :class:`DeclarationError` when the declared orientation makes the first tensor and
    ``down`` disagree on the hidden or the expert intermediate size (``is_transposed`` or
    ``down_transposed`` wrong).  Checked for 3D tensors with gate and up in one tensor (or no
    gate); other layouts are left to the run-time self-check."""
    if layout.flattened or layout.separate_gate_up:
        return
    first, down = resolve_tensor(module, layout.first_name), resolve_tensor(module, layout.down_name)
    if getattr(first, "ndim", 0) != 3 or getattr(down, "ndim", 0) != 3:
        return
    rows, columns = first.shape[1:]
    first_hidden, first_width = (rows, columns) if layout.is_transposed else (columns, rows)
    inner, outer = down.shape[1:]
    down_intermediate, down_hidden = (inner, outer) if layout.transposed_down else (outer, inner)
    if first_hidden == down_hidden and first_width == (2 if layout.has_gate else 1) * down_intermediate:
        return
    first_picture = "[E, H, 2I]" if layout.is_transposed else "[E, 2I, H]"
    if not layout.has_gate:
        first_picture = first_picture.replace("2I", "I")
    down_picture = "[E, I, H]" if layout.transposed_down else "[E, H, I]"
    raise DeclarationError(
        f"{where}: is_transposed={layout.is_transposed}"
        + ("" if layout.down_transposed is None else f", down_transposed={layout.down_transposed}")
        + f" reads {layout.first_name!r} {tuple(first.shape)} as {first_picture} and {layout.down_name!r} "
        f"{tuple(down.shape)} as {down_picture}, which disagree on H or I: check the orientation fields"
    )
