"""Meta-tests: every hookspec is documented, and each is implemented by core's generic
engine or the family base, so each is exercised by the conversion tests."""

import inspect

from defuser import hookspecs
from defuser.engine.generic import GenericEngine
from defuser.family import Family

SPECS = [name for name, value in vars(hookspecs).items() if name.startswith("defuser_") and callable(value)]


def test_there_are_hooks_for_the_three_jobs():
    assert {
        "defuser_detect_candidate",
        "defuser_preload_plan",
        "defuser_defuse_candidate",
        "defuser_plugin_info",
    } <= set(SPECS)


def test_every_hookspec_has_a_contract_docstring():
    for name in SPECS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and "Called" in doc, f"{name} lacks a docstring saying who calls it"
        spec_opts = getattr(getattr(hookspecs, name), "defuser_spec", {})
        if spec_opts.get("firstresult"):
            assert "Stops at first non-None result" in doc, name


def test_every_hookspec_is_implemented_by_core():
    implemented = {n for n in dir(GenericEngine) if n.startswith("defuser_")} | {
        n for n in dir(Family) if n.startswith("defuser_")
    }
    assert set(SPECS) <= implemented
