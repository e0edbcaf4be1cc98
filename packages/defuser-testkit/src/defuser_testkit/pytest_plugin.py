"""pytest plugin (entry point ``pytest11``) for defuser plugin authors.

* parametrizes :class:`defuser_testkit.conformance.FamilyConformance` tests over the model
  types each one applies to (with the class's ``xfail`` entries marked xfail);
* ``defuser_restore_patches``: undoes every ``replace_fused_blocks`` made during a test;
* ``defuser_plugin_manager``: a fresh plugin manager with autoload off, installed as the
  process-wide one for the test (register your plugin on it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from defuser_testkit.conformance import FamilyConformance


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cls = metafunc.cls
    group = getattr(metafunc.function, "_defuser_over", None)
    if cls is None or group is None or not issubclass(cls, FamilyConformance):
        return
    expected = getattr(cls, "xfail", {})

    def marks(model_type: str) -> list[pytest.MarkDecorator]:
        if group != "cases" and model_type in cls.unavailable:
            # a generate/preload type the installed transformers lacks: skipped, saying why
            return [pytest.mark.skip(reason=cls.unavailable[model_type])]
        reason = expected.get(f"{metafunc.function.__name__}[{model_type}]")
        return [] if reason is None else [pytest.mark.xfail(reason=reason, strict=False)]

    params = [
        pytest.param(model_type, id=model_type, marks=marks(model_type)) for model_type in sorted(getattr(cls, group))
    ]
    if group == "cases":
        params += [
            pytest.param(model_type, id=model_type, marks=pytest.mark.skip(reason=reason))
            for model_type, reason in sorted(cls.unavailable.items())
        ]
    if not params:
        params = [pytest.param(None, marks=pytest.mark.skip(reason=f"no {group} declared"))]
    metafunc.parametrize("model_type", params)


@pytest.fixture
def defuser_restore_patches() -> Iterator[None]:
    """Undo all pre-load patches made during the test."""
    from defuser import restore_fused_blocks

    yield
    restore_fused_blocks()


@pytest.fixture
def defuser_plugin_manager() -> Iterator[Any]:
    """A fresh manager (autoload off) used by ``convert_model`` during the test: see
    :func:`defuser.plugin.isolated_plugins`."""
    from defuser.plugin import isolated_plugins

    with isolated_plugins() as manager:
        yield manager
