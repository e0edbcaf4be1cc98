"""``defuser.plugin`` is the one module plugin authors import: cheap, complete, and the only
one first-party plugins and the testkit reach for (besides ``defuser`` itself)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import defuser.plugin
from defuser.plugin import Family, TypeSupport, isolated_plugins

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/src/**/*.py"))
TESTKIT_SOURCES = sorted(ROOT.glob("packages/defuser-testkit/src/**/*.py"))
# What a plugin or the testkit may import of defuser: the stable modules.
ALLOWED = {"defuser", "defuser.plugin"}


def _entry_point_modules() -> list[str]:
    """The module of every first-party plugin's ``defuser`` entry point."""
    modules = []
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        entry_points = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["entry-points"]["defuser"]
        modules += [value.split(":")[0] for value in entry_points.values()]
    return modules


def _defuser_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``defuser`` module in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "defuser" or name.startswith("defuser.")]
    return found


def test_every_first_party_plugin_is_found():
    assert len(_entry_point_modules()) == len(list(ROOT.glob("plugins/*/pyproject.toml"))) >= 20


@pytest.mark.subprocess
def test_importing_the_plugin_module_and_every_plugin_imports_no_torch():
    modules = ["defuser.plugin", *_entry_point_modules()]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], f"imported by {modules}"


@pytest.mark.parametrize("path", [*PLUGIN_SOURCES, *TESTKIT_SOURCES], ids=lambda path: str(path.relative_to(ROOT)))
def test_plugins_and_testkit_import_only_the_stable_modules(path: Path):
    outside = [f"line {line}: {module}" for line, module in _defuser_imports(path) if module not in ALLOWED]
    assert not outside, f"{path.relative_to(ROOT)} imports internal modules: {outside}"


@pytest.mark.parametrize("path", TESTKIT_SOURCES, ids=lambda path: path.name)
def test_the_testkit_swaps_no_private_state(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr == "_manager")
        or (isinstance(node, ast.Constant) and node.value == "_manager")
    ]
    assert not private, f"{path.name} touches defuser.plugins._manager at lines {private}"


def test_every_public_name_resolves():
    for name in defuser.plugin.__all__:
        assert getattr(defuser.plugin, name) is not None, name
    assert set(dir(defuser.plugin)) >= set(defuser.plugin.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Plugin'"):
        defuser.plugin.Plugin  # noqa: B018  # the lookup itself is under test


def test_parallel_layout_is_exported_with_the_other_layouts():
    import defuser.engine

    assert {"DenseLayout", "ExpertsLayout", "ParallelLayout"} <= set(defuser.engine.__all__)
    assert defuser.engine.ParallelLayout is defuser.plugin.ParallelLayout


def test_preload_is_the_default_and_opting_out_gives_no_plan():
    plugin = Family("acme", [TypeSupport("qwen3_moe"), TypeSupport("mixtral", preload=False)])
    assert plugin.info.support_for("qwen3_moe").preload is True
    assert plugin.defuser_preload_plan("mixtral") is None
    plan = plugin.defuser_preload_plan("qwen3_moe")
    assert isinstance(plan, defuser.plugin.PreloadPlan) and plan.model_type == "qwen3_moe"


def test_isolated_plugins_installs_a_fresh_manager_and_puts_the_old_one_back():
    from defuser import find_candidates
    from defuser.plugins import get_plugin_manager

    before = get_plugin_manager()
    plugin = Family("acme", [TypeSupport("qwen3_moe")], priority=100)
    with isolated_plugins(plugin) as manager:
        assert get_plugin_manager() is manager is not before
        assert manager.owner_of("qwen3_moe") == "acme"
        assert "qwen" not in manager.plugins, "autoload is off: no installed plugin loads"
        model = defuser.plugin.build_tiny_model("qwen3_moe")
        assert {candidate.plugin for candidate in find_candidates(model)} == {"acme"}
    assert get_plugin_manager() is before


def test_the_testkit_derives_cases_and_preload_from_the_declaration():
    from defuser_testkit.conformance import FamilyConformance

    plugin = Family(
        "acme",
        [TypeSupport("qwen3_moe"), TypeSupport("mixtral", preload=False), TypeSupport("no_such_type_here")],
    )

    class Derived(FamilyConformance):
        pass

    Derived.plugin = plugin  # set after the class body: nothing is derived

    class FromPlugin(FamilyConformance):
        plugin = Derived.plugin

    class Spelled(FamilyConformance):
        plugin = Derived.plugin
        preload = {"mixtral"}

    assert Derived.cases == {} and Derived.preload == set()
    assert set(FromPlugin.cases) == {"qwen3_moe", "mixtral"}
    assert set(FromPlugin.unavailable) == {"no_such_type_here"}
    assert FromPlugin.preload == {"qwen3_moe"}
    assert Spelled.preload == {"mixtral"} and set(Spelled.cases) == {"qwen3_moe", "mixtral"}


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["root", "plugin folder"])
def test_one_shared_conftest_restores_patches_around_every_plugin_test(where: str):
    # nox runs `pytest plugins/<family>/tests` from the root; authors also run it from the folder.
    assert not list(ROOT.glob("plugins/*/tests/conftest.py")), "per-plugin copies are back"
    cwd, target = (ROOT, "plugins/dbrx/tests") if where == "root" else (ROOT / "plugins" / "dbrx", "tests")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "--setup-plan", "-q", target],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = [line for line in result.stdout.splitlines() if "::" in line]
    assert planned and all("_restore" in line for line in planned), result.stdout[-2000:]
