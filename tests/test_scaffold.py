"""`defuser new-plugin`: the distribution it writes registers, declares its entry point as the
first-party plugins do, and its generated tests pass."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defuser.cli import main

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[1]


def _load_hooks(folder: Path, package: str):
    spec = importlib.util.spec_from_file_location(f"{package}.hooks", folder / "src" / package / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def generated(tmp_path, capsys):
    folder = tmp_path / "defuser-acme-moe"
    assert main(["new-plugin", "acme_moe", "--model-type", "qwen3_moe", "--dest", str(folder)]) == 0
    assert str(folder) in capsys.readouterr().out
    return folder


def test_writes_the_first_party_layout(generated):
    package = generated / "src" / "defuser_acme_moe"
    for path in ("pyproject.toml", "README.md", "tests/test_acme_moe.py"):
        assert (generated / path).is_file(), path
    for name in ("__init__.py", "hooks.py", "py.typed"):
        assert (package / name).is_file(), name
    assert not [p for p in generated.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_entry_point_is_declared_as_first_party_plugins_declare_it(generated):
    ours = tomllib.loads((generated / "pyproject.toml").read_text())
    theirs = tomllib.loads((ROOT / "plugins" / "qwen" / "pyproject.toml").read_text())
    assert ours["project"]["entry-points"]["defuser"] == {"acme_moe": "defuser_acme_moe.hooks:plugin"}
    assert set(theirs["project"]["entry-points"]) == set(ours["project"]["entry-points"])
    assert ours["build-system"] == theirs["build-system"]
    assert ours["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/defuser_acme_moe"]
    (core,) = ours["project"]["dependencies"]
    assert core.startswith("defuser-core>=") and ",<" in core


def test_hooks_register_on_a_fresh_manager_and_claim_the_type(generated):
    from defuser.family import Family
    from defuser.plugins import DefuserPluginManager

    hooks = _load_hooks(generated, "defuser_acme_moe")
    assert isinstance(hooks.plugin, Family)
    assert [t.model_type for t in hooks.plugin.info.model_types] == ["qwen3_moe"]
    manager = DefuserPluginManager(autoload=False)
    loaded = manager.register(hooks.plugin, "acme_moe")
    assert loaded.error is None
    assert manager.owner_of("qwen3_moe") == "acme_moe"


def test_refuses_an_existing_destination(generated, capsys):
    before = sorted(p.relative_to(generated) for p in generated.rglob("*"))
    assert main(["new-plugin", "acme_moe", "--dest", str(generated)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(generated) in line and "already exists" in line
    assert sorted(p.relative_to(generated) for p in generated.rglob("*")) == before


@pytest.mark.parametrize("name", ["Acme", "acme-moe", "1acme", "acme__moe", "acme_", "generic", ""])
def test_refuses_an_invalid_name(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["new-plugin", name, "--dest", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"invalid plugin name {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_an_unknown_model_type_with_close_matches(tmp_path, capsys):
    assert main(["new-plugin", "acme", "--model-type", "qwen3moe", "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'qwen3moe'" in err and "qwen3_moe" in err and "model_code" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_generated_tests_pass_with_its_source_on_the_path(generated):
    env = {**os.environ, "PYTHONPATH": str(generated / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=generated,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.subprocess
def test_its_wheel_declares_the_entry_point(generated, tmp_path):
    import zipfile

    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out), str(generated)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = out.glob("defuser_acme_moe-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read("defuser_acme_moe-0.1.0.dist-info/entry_points.txt").decode()
    assert "defuser_acme_moe/hooks.py" in names and "defuser_acme_moe/py.typed" in names
    assert "[defuser]\nacme_moe = defuser_acme_moe.hooks:plugin" in entry_points
