"""A third-party plugin, installed the way a user installs one, is a first-class citizen.

``tests/example_plugin`` is a separate distribution (``defuser-example-plugin``) with a
made-up model family (``toy_moe``).  It is built and installed with pip into a temporary
folder (the test virtual environment is never changed) that the subprocesses below put on
``PYTHONPATH``; there it is discovered through its entry point, listed by ``defuser
plugins``, converts its model, obeys the allow/block switches, and passes defuser-testkit's
conformance suite run as its author would run it.  Hand-written distributions next to it
show a plugin that fails to import and one whose core range excludes the installed core.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from defuser.compat import transformers_version

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "example_plugin"
BIN = Path(sys.executable).parent / "defuser"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.skipif(
        importlib.util.find_spec("hatchling") is None,
        reason="installing the example plugin offline needs hatchling importable (pip install hatchling)",
    ),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the example plugin is installed into by pip (wheel built offline)."""
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--quiet", "--disable-pip-version-check", "--target", str(target), str(EXAMPLE)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"pip install of {EXAMPLE} failed:\n{result.stdout}\n{result.stderr}"
    assert (target / "defuser_example" / "hooks.py").is_file()
    return target


def _env(*folders: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFUSER_")}
    paths = [str(folder) for folder in folders] + [p for p in [env.get("PYTHONPATH")] if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **variables}


def _python(code: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _defuser(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "defuser.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hand-made installed distributions: one fails to import, one needs core >= 2."""
    folder = tmp_path_factory.mktemp("broken_site")
    plugins = {
        "broken": ("defuser-broken-plugin", "raise ImportError('needs libfoo, which is not installed')\n"),
        "future": (
            "defuser-future-plugin",
            "from defuser.family import Family\n"
            "from defuser.plugin_info import TypeSupport\n"
            "plugin = Family(name='future', model_types=[TypeSupport('toy_moe')], core='>=2.0', priority=50)\n",
        ),
    }
    for name, (distribution, source) in plugins.items():
        (folder / f"defuser_{name}.py").write_text(source)
        info = folder / f"{distribution.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[defuser]\n{name} = defuser_{name}:plugin\n")
    return folder


# One subprocess does the looking and converting (each costs an import of torch and
# transformers); the tests below read its report.
_REPORT = """
    import json, sys
    import defuser
    report = {"before": sorted(m for m in sys.modules if m.startswith("defuser_example"))}
    from defuser.plugins import configure, get_plugin_manager, list_plugins
    listed = {p.name: p for p in list_plugins()}
    report["after"] = sorted(m for m in sys.modules if m.startswith("defuser_example"))
    report["plugins"] = {
        name: {"distribution": p.distribution, "version": p.version, "error": p.error,
               "types": [t.model_type for t in p.info.model_types] if p.info else None,
               "core": p.info.core if p.info else None}
        for name, p in listed.items()
    }
    report["file"] = sys.modules["defuser_example"].__file__
    report["owner"] = get_plugin_manager().owner_of("toy_moe")

    import defuser_example.modeling  # registers toy_moe with transformers
    from defuser import convert_model
    from defuser.api import find_candidates
    from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

    def attempt(model_type="toy_moe"):
        model = build_tiny_model(model_type)
        inputs = tiny_inputs(model)
        reference = tiny_forward(model, inputs)
        converted = convert_model(model)
        difference = (tiny_forward(model, inputs) - reference).abs().max().item()
        experts = model.model.layers[0].experts if model_type == "toy_moe" else model.model.layers[0].mlp.experts
        return {"converted": converted, "difference": difference, "left": len(find_candidates(model)),
                "experts": type(experts).__name__}

    report["env"] = attempt()
    report["qwen3_moe"] = attempt("qwen3_moe")
    configure(block=["example"])
    report["block"] = attempt()
    configure(allow=["example"], block=[])
    report["allow"] = attempt()
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(site: Path, broken_site: Path) -> dict:
    return _python(_REPORT, _env(site, broken_site))


def test_discovered_through_its_entry_point_and_loaded_lazily(report, site):
    assert report["before"] == [], "import defuser imported the plugin"
    # Discovery imports the cheap hooks module only, not the model code.
    assert report["after"] == ["defuser_example", "defuser_example.hooks"]
    example = report["plugins"]["example"]
    assert (example["distribution"], example["version"], example["error"]) == ("defuser-example-plugin", "0.1.0", None)
    assert example["types"] == ["toy_moe"] and example["core"] == ">=0.1,<1"
    assert Path(report["file"]).is_relative_to(site), "the installed copy must be the one loaded"


def test_it_converts_its_model_and_the_configured_choice_decides(report):
    assert report["owner"] == "example"
    for case in ("env", "allow"):
        assert report[case]["converted"] is True and report[case]["left"] == 0, case
        assert report[case]["experts"] == "DefusedToyMoeExperts" and report[case]["difference"] <= 1e-5, case
    # Blocked, nothing else knows the undecorated toy experts: nothing to defuse.
    assert (report["block"]["converted"], report["block"]["experts"]) == (False, "ToyMoeExperts")


def test_broken_and_out_of_range_plugins_are_named_and_the_rest_still_convert(report):
    broken, future = report["plugins"]["broken"], report["plugins"]["future"]
    assert broken["error"] == (
        "plugin 'broken': import of defuser_broken:plugin failed: ImportError: needs libfoo, which is not installed"
    )
    assert future["error"] == "plugin 'future' requires defuser-core>=2.0, but defuser-core 0.1.0 is installed"
    assert future["distribution"] == "defuser-future-plugin"
    # The refused plugin claims nothing (it asked for priority 50 on toy_moe).
    assert report["owner"] == "example"
    assert report["qwen3_moe"]["converted"] is True and report["qwen3_moe"]["left"] == 0
    assert report["plugins"]["qwen"]["error"] is None


def test_the_environment_blocks_it_and_an_api_argument_wins(site):
    blocked = _python(
        """
        import json
        import defuser_example.modeling
        from defuser import convert_model
        from defuser.plugins import configure, get_plugin_manager
        from defuser.tiny import build_tiny_model
        report = {"owner": get_plugin_manager().owner_of("toy_moe"), "env": convert_model(build_tiny_model("toy_moe"))}
        configure(allow=["example"], block=[])
        report["argument"] = convert_model(build_tiny_model("toy_moe"))
        print(json.dumps(report))
        """,
        _env(site, DEFUSER_DISABLED_PLUGINS="example", DEFUSER_LOAD_PLUGINS="example,qwen"),
    )
    assert blocked == {"owner": None, "env": False, "argument": True}


def test_defuser_plugins_lists_it_and_says_why_others_are_skipped(site, broken_site):
    result = _defuser("plugins", env=_env(site, broken_site))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    # The example names no release it was tested on: untested on whichever is installed.
    described = ["example", "defuser-example-plugin", "0.1.0", ">=5.3.0", "-", "toy_moe"]
    assert lines["example"].split() == [*described, "ok,", "untested", "on", str(transformers_version())]
    assert "plugin 'broken': import of defuser_broken:plugin failed: ImportError: needs libfoo" in lines["broken"]
    assert "plugin 'future' requires defuser-core>=2.0, but defuser-core 0.1.0 is installed" in lines["future"]
    assert "defuser-future-plugin" in lines["future"] and lines["qwen"].split()[-1] == "ok"
    assert "conflicts" not in result.stdout, "a refused plugin claims nothing"


def test_the_testkit_conformance_suite_passes_on_it(site, tmp_path):
    report = tmp_path / "conformance.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", f"--junitxml={report}", "tests"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(site),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        children = {child.tag for child in case}
        outcome = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        outcomes[case.get("name")] = outcome
    passed = {name for name, outcome in outcomes.items() if outcome == "passed"}
    for check in ("converts_with_equal_outputs", "meta_device", "max_layers_converts_first_layers_only"):
        assert f"test_{check}[toy_moe]" in passed, outcomes
    for check in ("filter_excludes_and_includes", "saves_and_reloads"):
        assert f"test_{check}[toy_moe]" in passed, outcomes
    assert {"test_every_declared_type_is_tested", "test_the_plugin_is_what_teaches_defuser_the_layout"} <= passed
    # The example declares no generate or preload types: those two tests skip, nothing else.
    not_passed = {name.split("[")[0] for name, outcome in outcomes.items() if outcome != "passed"}
    assert not_passed <= {"test_generate_same_tokens", "test_preload_patch_loads_both_layouts"}, outcomes


def test_the_guide_is_linked_from_the_readme():
    guide = ROOT / "docs" / "writing-a-plugin.md"
    assert "docs/writing-a-plugin.md" in (ROOT / "README.md").read_text()
    text = guide.read_text()
    topics = ["defuser_detect_candidate", "defuser_preload_plan", "defuser_defuse_candidate", "defuser_plugin_info"]
    topics += ["[project.entry-points.defuser]", "Family(", "FamilyConformance", "cases_for", "core=", "example_plugin"]
    for topic in topics:
        assert topic in text, f"the guide does not cover {topic}"
