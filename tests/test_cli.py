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


@pytest.mark.subprocess
def test_demo_defaults_to_a_builtin_tiny_model():
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Qwen3MoeExperts" in out and "DefusedQwen3MoeExperts[8]" in out
    assert "model.layers.0.mlp.experts.0..7: gate_proj 16x32, up_proj 16x32, down_proj 32x16" in out
    difference = float(out.rsplit("before/after:", 1)[1])
    assert difference <= 1e-5


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", ["mixtral", "glm4", "jetmoe", "dbrx", "llama4_text"])
def test_demo_other_model_types(model_type):
    result = _run("demo", "--model-type", model_type)
    assert result.returncode == 0, result.stderr
    assert "before/after" in result.stdout


@pytest.mark.subprocess
def test_demo_unknown_model_type_is_one_clear_line():
    result = _run("demo", "--model-type", "no_such_type")
    assert result.returncode != 0
    assert "no_such_type" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.subprocess
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


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny qwen3_moe checkpoint (config and weights) in a local folder."""
    from defuser.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("qwen3_moe")
    build_tiny_model("qwen3_moe").save_pretrained(folder)
    return folder


@pytest.mark.subprocess
def test_inspect_previews_from_the_config_alone(qwen_folder):
    result = _run("inspect", str(qwen_folder / "config.json"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model.layers.*.mlp.experts" in out and "Qwen3MoeExperts" in out
    assert "gate_up_proj 8x32x32, down_proj 8x32x16" in out
    assert "8 experts x (gate_proj, up_proj, down_proj) nn.Linear" in out
    assert "before load" in out and "2/2" in out
    assert "parameters in fused blocks: 24,576 (24,576 selected)" in out


@pytest.mark.subprocess
def test_inspect_json_with_max_layers_and_filter(qwen_folder):
    import json

    report = json.loads(_run("inspect", str(qwen_folder), "--json", "--max-layers", "1").stdout)
    (group,) = report["candidates"]
    assert (group["count"], group["selected"], group["layers"]) == (2, 1, [0, 1])
    assert report["fused_parameters"] == 24576 and report["selected_fused_parameters"] == 12288
    filtered = json.loads(_run("inspect", str(qwen_folder), "--json", "--filter", "layers\\.1\\.").stdout)
    assert filtered["candidates"][0]["selected"] == 1


@pytest.mark.subprocess
def test_verify_loads_converts_and_compares(qwen_folder):
    result = _run("verify", str(qwen_folder))
    assert result.returncode == 0, result.stderr
    assert "\nlogits " in result.stdout and " ok" in result.stdout
    failing = _run("verify", str(qwen_folder), "--atol", "-1")
    assert failing.returncode == 1 and "FAIL" in failing.stdout


@pytest.mark.subprocess
def test_verify_compares_a_bfloat16_model_with_the_eager_loop_within_its_dtype(tmp_path):
    # transformers' default grouped_mm rounds bfloat16 differently from its eager per-expert
    # loop, which the defused experts compute; 1e-5 would fail on rounding alone.
    import torch

    from defuser.tiny import build_tiny_model

    build_tiny_model("mixtral", dtype=torch.bfloat16).save_pretrained(tmp_path)
    result = _run("verify", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reference: the fused model, experts run by transformers' eager loop" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("logits "))
    difference, atol = float(row.split()[1]), float(row.split()[3])
    assert 1e-5 < atol < 0.1 and difference <= atol
    assert _run("verify", str(tmp_path), "--atol", "-1").returncode == 1  # an explicit --atol is what counts


def test_verify_default_tolerance_follows_the_model_dtype():
    import torch

    from defuser.cli import _default_atol

    logits = torch.tensor([0.5, -2.0])
    assert _default_atol(logits, torch.float32) == 1e-5
    assert _default_atol(logits.bfloat16(), torch.bfloat16) == pytest.approx(0.03 * 2.0)
    # A bfloat16 model whose head casts its logits to float32 still rounds in bfloat16.
    assert _default_atol(logits, torch.bfloat16) == pytest.approx(0.03 * 2.0)
    assert _default_atol(torch.tensor([1e-6]), torch.float16) == 1e-5


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file or directory"),
        ("unknown", "made_up_moe"),
        ("dense", "nothing to defuse in llama"),
    ],
)
def test_errors_for_people(tmp_path, setup, message):
    import json

    source = tmp_path / "model"
    if setup == "unknown":
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "made_up_moe"}))
    elif setup == "dense":
        from transformers import LlamaConfig

        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
            source
        )
    result = _run("inspect", str(source))
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if setup != "dense":
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.subprocess
def test_debug_shows_the_traceback(tmp_path):
    result = _run("--debug", "inspect", str(tmp_path / "missing"))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.subprocess
def test_plugins_lists_every_first_party_plugin():
    result = _run("plugins")
    assert result.returncode == 0
    for name in ("qwen", "glm", "mixtral", "deepseek", "gpt_oss", "llama4", "generic"):
        assert f"\n{name} " in result.stdout


@pytest.mark.subprocess
def test_quiet_hides_progress_bars(qwen_folder):
    loud = _run("verify", str(qwen_folder))
    quiet = _run("--quiet", "verify", str(qwen_folder))
    assert quiet.returncode == 0
    assert "Loading weights" in loud.stderr
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr


def test_plugins_names_conflicts_and_the_winner(defuser_plugin_manager, capsys):
    from defuser.cli import main
    from defuser.family import Family
    from defuser.plugin_info import TypeSupport

    defuser_plugin_manager.register(Family(name="first", model_types=[TypeSupport("qwen3_moe")], priority=5), "first")
    defuser_plugin_manager.register(Family(name="second", model_types=[TypeSupport("qwen3_moe")]), "second")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "conflicts" in out and "qwen3_moe: first, second -> first" in out


@pytest.mark.subprocess
def test_inspect_reads_a_hub_id_from_the_local_cache_only(tmp_path, qwen_folder):
    import os
    import shutil

    snapshot = tmp_path / "models--acme--tiny-moe" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(qwen_folder, snapshot)
    (tmp_path / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-moe" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "defuser.cli"]
    found = subprocess.run([*command, "inspect", "acme/tiny-moe"], capture_output=True, text=True, env=env, timeout=300)
    assert found.returncode == 0, found.stderr
    assert "Qwen3MoeExperts" in found.stdout
    missing = subprocess.run([*command, "inspect", "acme/absent"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1 and "acme/absent" in missing.stderr


@pytest.mark.subprocess
def test_unsupported_transformers_is_one_line_and_non_zero():
    code = (
        "from packaging.version import Version\n"
        "import defuser.compat as compat\n"
        "compat.transformers_version = lambda: Version('5.2.0')\n"
        "from defuser.cli import main\n"
        "raise SystemExit(main(['demo']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == "defuser demo: error: needs transformers>=5.3.0, found 5.2.0"


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("qwen3moe", "qwen3_moe"), ("Mixtral", "mixtral"), ("QWEN3-MOE", "qwen3_moe")],
)
def test_mistyped_model_type_is_one_line_with_close_matches(typed, suggested, capsys):
    from defuser.cli import main

    assert main(["demo", "--model-type", typed]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert repr(typed) in line and "did you mean" in line
    named = line.split("did you mean", 1)[1].strip(" ?").split(", ")
    assert suggested in named and len(named) <= 3
    assert captured.out == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_subcommand_lowers_transformers_and_restores(where, monkeypatch, capsys):
    import os
    import warnings

    from transformers.utils import logging as transformers_logging

    import defuser.cli as cli

    seen = {}

    def fake_plugins(args):
        seen["quiet"] = args.quiet
        seen["verbosity"] = transformers_logging.get_verbosity()
        seen["tqdm"] = os.environ.get("TQDM_DISABLE")
        seen["bars"] = transformers_logging.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("a warning the user asked not to see", UserWarning, stacklevel=1)
        seen["warnings"] = len(caught)
        return 0

    monkeypatch.setattr(cli, "_plugins", fake_plugins)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    transformers_logging.set_verbosity_warning()
    transformers_logging.enable_progress_bar()
    argv = ["--quiet", "plugins"] if where == "before" else ["plugins", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
        assert seen == {
            "quiet": True,
            "verbosity": transformers_logging.ERROR,
            "tqdm": "1",
            "bars": False,
            "warnings": 0,
        }
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING
        assert transformers_logging.is_progress_bar_enabled()
        assert "TQDM_DISABLE" not in os.environ
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("seen again", UserWarning, stacklevel=1)
        assert len(caught) == 1


def test_quiet_puts_back_a_tqdm_disable_the_user_had(monkeypatch):
    import os

    import defuser.cli as cli

    monkeypatch.setattr(cli, "_plugins", lambda args: 0)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert cli.main(["plugins", "--quiet"]) == 0
    assert os.environ["TQDM_DISABLE"] == "0"


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_max_layers_must_be_positive(command, value, capsys):
    from defuser.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "somewhere", "--max-layers", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-layers" in err and "1 or more" in err and value in err


@pytest.mark.subprocess
def test_demo_lists_parallel_experts_with_their_last_index():
    import re

    result = _run("demo", "--model-type", "jetmoe")
    assert result.returncode == 0, result.stderr
    assert re.search(r"mlp\.input_linear\.0\.\.\d+: ", result.stdout), result.stdout
    assert ".0..:" not in result.stdout


@pytest.mark.subprocess
def test_quiet_after_the_subcommand_hides_progress_bars(qwen_folder):
    quiet = _run("verify", str(qwen_folder), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr


@pytest.fixture(scope="module")
def gpt_oss_folders(tmp_path_factory):
    """A tiny fused gpt_oss checkpoint and the per-expert one `defuser convert` writes from it:
    stock transformers has no mapping that loads the per-expert experts into the fused model."""
    from defuser.offline import convert_checkpoint
    from defuser.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("gpt_oss")
    build_tiny_model("gpt_oss").save_pretrained(root / "fused")
    convert_checkpoint(root / "fused", root / "per_expert")
    return root / "fused", root / "per_expert"


@pytest.mark.subprocess
def test_verify_loads_a_per_expert_checkpoint_through_replace_fused_blocks(gpt_oss_folders):
    result = _run("verify", str(gpt_oss_folders[1]))
    assert result.returncode == 0, result.stderr
    assert "loaded through replace_fused_blocks" in result.stdout and " ok" in result.stdout


def test_verify_loads_the_per_expert_weights_not_random_ones(gpt_oss_folders):
    import torch

    from defuser import restore_fused_blocks
    from defuser.cli import _load_for_verify, _outputs
    from defuser.report import load_config
    from defuser.tiny import tiny_inputs

    fused, per_expert = (str(folder) for folder in gpt_oss_folders)
    reference, how = _load_for_verify(fused, load_config(fused))
    assert how == "stock"
    loaded, how = _load_for_verify(per_expert, load_config(per_expert))
    assert how == "replace_fused_blocks"
    assert restore_fused_blocks() == []  # the patch lasted only for the load
    inputs = tiny_inputs(reference)
    torch.testing.assert_close(_outputs(loaded, inputs)["logits"], _outputs(reference, inputs)["logits"])


@pytest.mark.subprocess
def test_verify_fails_on_a_weight_missing_from_the_checkpoint(tmp_path, gpt_oss_folders):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(gpt_oss_folders[0], broken)
    tensors = load_file(broken / "model.safetensors")
    dropped = next(name for name in tensors if name.endswith("mlp.experts.down_proj"))
    del tensors[dropped]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = _run("verify", str(broken))
    assert result.returncode == 1
    assert "does not load completely" in result.stderr and "1 missing" in result.stderr and dropped in result.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_model_type_that_is_no_string_names_the_file_and_field(tmp_path, command):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": ["qwen3_moe"]}))
    result = _run(command, str(tmp_path))
    assert result.returncode == 1
    assert "config.json: field model_type is ['qwen3_moe'], not a string" in result.stderr
