"""The README tells the truth: its table is the generated one and its commands exist."""

from pathlib import Path

from defuser.tables import supported_models_markdown

ROOT = Path(__file__).parents[1]


def test_supported_models_table_is_generated():
    assert supported_models_markdown() in (ROOT / "README.md").read_text()


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme and (ROOT / script).exists()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
