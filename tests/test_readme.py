"""The README tells the truth: its table is the generated one and its commands exist."""

import re
from pathlib import Path

import pytest

from defuser.tables import supported_models_markdown

ROOT = Path(__file__).parents[1]


def test_supported_models_table_is_generated():
    assert supported_models_markdown() in (ROOT / "README.md").read_text()


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme and (ROOT / script).exists()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _text_blocks(readme: str) -> list[str]:
    return [block.split("```", 1)[0].strip("\n") for block in readme.split("```text\n")[1:]]


# A float in scientific notation, as the CLI prints differences: its last bits differ between
# machines (BLAS kernels, CPU features), so the README's text is compared with them masked and
# the live figures are checked against a tolerance instead.
_FIGURE = re.compile(r"\d\.\d{3}e[+-]\d{2}")


def _masked(text: str) -> str:
    return _FIGURE.sub("<figure>", text)


def _defuser(*args: str) -> str:
    import subprocess
    import sys

    binary = Path(sys.executable).parent / "defuser"
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300, check=True)
    return result.stdout.strip("\n")


@pytest.mark.subprocess
def test_readme_shows_real_demo_and_inspect_output(tmp_path):
    from transformers import CONFIG_MAPPING

    from defuser.tiny import tiny_config

    blocks = [_masked(block) for block in _text_blocks((ROOT / "README.md").read_text())]
    demo = _defuser("demo")
    figures = [float(figure) for figure in _FIGURE.findall(demo)]
    assert figures and all(figure <= 1e-5 for figure in figures), demo
    assert _masked(demo) in blocks
    if "minimax_m3_vl_text" not in CONFIG_MAPPING:
        pytest.skip("the README's inspect example needs a transformers with minimax_m3_vl_text (5.24.0)")
    tiny_config("minimax_m3_vl_text").save_pretrained(tmp_path)
    assert _masked(_defuser("inspect", str(tmp_path), "--max-layers", "1")) in blocks
