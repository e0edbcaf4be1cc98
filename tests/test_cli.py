"""The `defuser` command, driven in a subprocess as a user would."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "defuser"


def _run(*args):
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "defuser.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_demo_defaults_to_a_builtin_tiny_model():
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Qwen3MoeExperts" in out and "DefusedQwen3MoeExperts[8]" in out
    assert "model.layers.0.mlp.experts.0..7: gate_proj 16x32, up_proj 16x32, down_proj 32x16" in out
    difference = float(out.rsplit("before/after:", 1)[1])
    assert difference <= 1e-5


@pytest.mark.parametrize("model_type", ["mixtral", "glm4", "jetmoe", "dbrx", "llama4_text"])
def test_demo_other_model_types(model_type):
    result = _run("demo", "--model-type", model_type)
    assert result.returncode == 0, result.stderr
    assert "before/after" in result.stdout


def test_demo_unknown_model_type_is_one_clear_line():
    result = _run("demo", "--model-type", "no_such_type")
    assert result.returncode != 0
    assert "no_such_type" in result.stderr and "Traceback" not in result.stderr


def test_plugins_lists_first_party_plugins():
    result = _run("plugins")
    assert result.returncode == 0, result.stderr
    for name, dist in [("qwen", "defuser-qwen"), ("mixtral", "defuser-mixtral"), ("glm", "defuser-glm")]:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
        assert dist in line and "ok" in line


def test_entry_points_group_lists_every_plugin_folder():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="defuser")}
    folders = {p.name for p in (Path(__file__).parents[1] / "plugins").iterdir() if (p / "pyproject.toml").exists()}
    assert folders <= names
    assert shutil.which("defuser") or BIN.exists()
