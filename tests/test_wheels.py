"""Every distribution of the monorepo builds a wheel with the files and entry points it promises."""

from __future__ import annotations

import configparser
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_wheels.sh"
# One plugin distribution per folder under plugins/ (wheel names use underscores).
PLUGIN_DIRS = sorted(path for path in (ROOT / "plugins").iterdir() if (path / "pyproject.toml").is_file())
PLUGINS = tuple(f"defuser_{path.name}" for path in PLUGIN_DIRS)
DISTRIBUTIONS = ("defuser_core", *PLUGINS, "defuser_testkit", "defuser")

_missing = [name for name in ("build", "hatchling") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"building wheels needs {' and '.join(_missing)} importable (pip install build hatchling)",
    ),
]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build every wheel once with scripts/build_wheels.sh; map distribution name -> wheel path."""
    outdir = tmp_path_factory.mktemp("wheels")
    result = subprocess.run(
        ["bash", str(SCRIPT), str(outdir)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"build_wheels.sh failed:\n{result.stdout}\n{result.stderr}"
    built = sorted(outdir.glob("*.whl"))
    assert sorted(line for line in result.stdout.splitlines() if line) == [path.name for path in built]
    by_name: dict[str, list[Path]] = {}
    for path in built:
        by_name.setdefault(path.name.split("-", 1)[0], []).append(path)
    for name, paths in by_name.items():
        assert len(paths) == 1, f"more than one wheel for {name}: {paths}"
    return {name: paths[0] for name, paths in by_name.items()}


def test_one_wheel_per_distribution(wheels: dict[str, Path]) -> None:
    assert sorted(wheels) == sorted(DISTRIBUTIONS)


def test_core_wheel_ships_typing_marker_and_hookspecs(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["defuser_core"]) as archive:
        names = set(archive.namelist())
    assert "defuser/py.typed" in names
    assert "defuser/hookspecs.py" in names


def _entry_points(wheel: Path) -> configparser.ConfigParser:
    with zipfile.ZipFile(wheel) as archive:
        matches = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        assert len(matches) == 1, f"{wheel.name} has no entry_points.txt"
        text = archive.read(matches[0]).decode("utf-8")
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep entry point names as written
    parser.read_string(text)
    return parser


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugin_wheel_declares_defuser_entry_point(wheels: dict[str, Path], plugin: str) -> None:
    entry_points = _entry_points(wheels[plugin])
    assert entry_points.has_section("defuser"), f"{plugin} wheel declares no [defuser] entry points"
    assert entry_points.items("defuser"), f"{plugin} wheel's [defuser] group is empty"
    for _name, target in entry_points.items("defuser"):
        assert target.strip().startswith(f"{plugin}."), target


def test_umbrella_wheel_is_metadata_only(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["defuser"]) as archive:
        names = archive.namelist()
        metadata = archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    assert all(name.startswith("defuser-") and ".dist-info/" in name for name in names), names
    requires = {
        Requirement(line.split(":", 1)[1]).name for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    }
    expected = {"defuser-core"} | {f"defuser-{path.name.replace('_', '-')}" for path in PLUGIN_DIRS}
    assert requires == expected
