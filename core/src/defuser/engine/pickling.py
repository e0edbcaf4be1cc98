"""Pickling modules whose class defuser generates at run time.

The defused experts classes (``DefusedQwen3MoeExperts``), the split dense MLP classes (a
``Phi3MLP`` subclass named ``Phi3MLP``) and the classes ``replace_fused_blocks`` installs are
made with ``type(...)``: no module attribute holds them, so pickle cannot save them by name.
Their instances pickle instead as "the class a factory makes for this stock class" (the stock
class by module and qualified name, the factory by reference) plus the instance state; loading
asks the factory (cached: the same class object as a conversion in that process makes) again.
While ``replace_fused_blocks`` has a class replaced, its module attribute names the replacement:
the stock class is read back through the replacement's ``_defuser_original`` mark (or what the
factory knows of its own classes), so saving and loading work inside a patch too.

``copy.deepcopy`` goes through the same reduction but keeps the very class (it is not copied).
"""

from __future__ import annotations

import copy
import importlib
import pickle
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["StockByName", "StockFunction", "reduce_generated", "restored_state", "stock_class_named"]

# Builds the generated class from the class found under the stock name (and options).
ClassFactory = Callable[..., type]


def stock_class_named(module_name: str, qualname: str) -> type:
    """The class ``module_name.qualname`` names, unwrapped to the stock class where
    ``replace_fused_blocks`` installed a replacement there; :class:`pickle.UnpicklingError`
    naming it when it is gone (a transformers release without it)."""
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise pickle.UnpicklingError(
            f"cannot rebuild a defused module of {module_name}.{qualname}: that class is not "
            f"found in this environment ({error}); load it where the same transformers release is installed"
        ) from error
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise pickle.UnpicklingError(
            f"cannot rebuild a defused module of {module_name}.{qualname}: not an nn.Module class"
        )
    from defuser.engine.experts import DefusedExperts

    if issubclass(found, DefusedExperts) and found.fused_class is not None:
        return found.fused_class
    original = found.__dict__.get("_defuser_original")
    return original if isinstance(original, type) else found


def _generated_class(factory: ClassFactory, module_name: str, qualname: str, options: dict[str, Any]) -> type:
    stock = stock_class_named(module_name, qualname)
    return factory(stock, **options)


class _GeneratedClass:
    """A generated class as a reduce argument: pickled as its recipe, deep-copied as itself."""

    __slots__ = ("factory", "generated", "options", "stock")

    def __init__(self, generated: type, factory: ClassFactory, stock: type, options: dict[str, Any]):
        self.generated = generated
        self.factory = factory
        self.stock = stock
        self.options = options

    def __reduce__(self) -> tuple[Any, ...]:
        return (_generated_class, (self.factory, self.stock.__module__, self.stock.__qualname__, self.options))

    def __deepcopy__(self, memo: dict[int, Any]) -> type:
        return self.generated


def _new_instance(cls: type | _GeneratedClass) -> Any:
    # ``copy.copy`` hands the reduce arguments over as they are (no pickling, no deep copy).
    if isinstance(cls, _GeneratedClass):
        cls = cls.generated
    return cls.__new__(cls)


def restored_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the :class:`StockByName` / :class:`StockFunction` wrappers put in it by
    ``__getstate__`` / :func:`reduce_generated` replaced by what they wrap; ``copy.copy`` hands
    them to ``__setstate__`` as they are (pickle and deepcopy have replaced them already)."""
    wrappers = StockByName | StockFunction
    if not any(isinstance(value, wrappers) for value in state.values()):
        return state
    return {name: value.wrapped() if isinstance(value, wrappers) else value for name, value in state.items()}


def reduce_generated(
    instance: nn.Module,
    factory: ClassFactory,
    stock: type,
    options: dict[str, Any] | None = None,
    stock_modules: tuple[str, ...] = (),
) -> tuple[Any, ...]:
    """What ``instance.__reduce_ex__`` returns for an instance of a generated class: rebuilt as an
    instance of ``factory(stock, **options)`` with ``instance``'s state, in which the modules
    under the names ``stock_modules`` (instances of stock classes) pickle through
    :class:`StockByName`."""
    state = dict(instance.__getstate__())
    for name in stock_modules:
        if isinstance(state.get(name), nn.Module):
            state[name] = StockByName(state[name])
    recipe = _GeneratedClass(type(instance), factory, stock, dict(options or {}))
    return (_new_instance, (recipe,), state)


def _instance_of_named(module_name: str, qualname: str, state: Any) -> nn.Module:
    cls = stock_class_named(module_name, qualname)
    instance = cls.__new__(cls)
    instance.__setstate__(state)
    return instance


class StockByName:
    """Wraps a stock-class module kept in a generated instance's state (a fused skeleton) so it
    pickles with its class found by name through :func:`stock_class_named`, inside a
    ``replace_fused_blocks`` patch too; deep-copied, it is the module's deep copy."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __reduce__(self) -> tuple[Any, ...]:
        cls = type(self.module)
        return (_instance_of_named, (cls.__module__, cls.__qualname__, self.module.__getstate__()))

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        return copy.deepcopy(self.module, memo)

    def wrapped(self) -> nn.Module:
        """The module itself."""
        return self.module


def _function_named(module_name: str, qualname: str) -> Callable[..., Any]:
    owner, _, name = qualname.rpartition(".")
    if not owner:
        return getattr(importlib.import_module(module_name), name)
    found = getattr(stock_class_named(module_name, owner), name, None)
    if found is None:
        raise pickle.UnpicklingError(f"cannot rebuild a defused module: {module_name}.{qualname} is not found here")
    return found


class StockFunction:
    """Wraps a function of a stock class kept in a defused module's state (the fused class's own
    ``_apply_gate``) so it pickles by name through :func:`stock_class_named`, inside a
    ``replace_fused_blocks`` patch too; deep-copied, it is the function itself."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __reduce__(self) -> tuple[Any, ...]:
        return (_function_named, (self.function.__module__, self.function.__qualname__))

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., Any]:
        return self.function

    def wrapped(self) -> Callable[..., Any]:
        """The function itself."""
        return self.function
