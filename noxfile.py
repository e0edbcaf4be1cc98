"""Nox sessions for the defuser monorepo.

    nox -l                           # list sessions
    nox -s "tests-mixtral(latest)"   # one plugin against the newest supported transformers
    nox -t qwen                      # every session of one family
    nox -s lint build

Sessions use the virtualenv backend: torch comes from a local CPU wheel that pip finds but uv
does not, and it must always be pinned to exactly TORCH_VERSION.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: nox itself depends on tomli there
    import tomli as tomllib

nox.options.default_venv_backend = "virtualenv"

ROOT = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"


def _releases() -> dict[str, str]:
    """Oldest supported and newest served transformers releases (scripts/transformers_releases.py,
    the one place that names them; the newest is asked of the package index when nox starts)."""
    spec = importlib.util.spec_from_file_location(
        "transformers_releases", ROOT / "scripts" / "transformers_releases.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.releases()


_RELEASES = _releases()
# Sessions are named by these ids, whatever the versions are today.
TRANSFORMERS_VERSIONS = [
    nox.param(_RELEASES["oldest"], id="oldest"),
    nox.param(_RELEASES["newest"], id="latest"),
]

# Test runner and test-only libraries every test session installs.
TEST_DEPS = ("pytest", "hypothesis", "scipy")

# Tests never download: a default config naming a hub backbone must not reach the network.
OFFLINE = {"HF_HUB_OFFLINE": "1"}

CORE = "core"
TESTKIT = "packages/defuser-testkit"
# One plugin distribution per folder under plugins/; adding a folder adds its test session.
FAMILIES = sorted(path.name for path in (ROOT / "plugins").iterdir() if (path / "pyproject.toml").is_file())


def _distribution_dirs() -> list[Path]:
    """Every folder that holds a distribution: core, each plugin, each package under packages/."""
    candidates = [ROOT / CORE, *sorted((ROOT / "plugins").iterdir()), *sorted((ROOT / "packages").iterdir())]
    return [path for path in candidates if (path / "pyproject.toml").is_file()]


def _install_stack(session: nox.Session, transformers: str, *editables: str, extra: tuple[str, ...] = ()) -> None:
    """Install torch, then transformers, then the editable distributions, keeping both pins fixed."""
    pins = (f"torch=={TORCH_VERSION}", f"transformers=={transformers}")
    session.install(pins[0])
    session.install(*pins)
    args: list[str] = []
    for path in editables:
        args += ["-e", path]
    session.install(*args, *TEST_DEPS, *extra, *pins)


def _make_family_session(family: str) -> None:
    def tests(session: nox.Session, transformers: str) -> None:
        _install_stack(session, transformers, CORE, TESTKIT, f"plugins/{family}")
        session.run("pytest", f"plugins/{family}/tests", *session.posargs, env=OFFLINE)

    tests.__doc__ = f"Run the {family} plugin's tests against one supported transformers release."
    tests.__name__ = f"tests_{family}"
    parametrized = nox.parametrize("transformers", TRANSFORMERS_VERSIONS)(tests)
    nox.session(name=f"tests-{family}", tags=[family, "tests"])(parametrized)


for _family in FAMILIES:
    _make_family_session(_family)


@nox.session(name="tests-core", tags=["core", "tests"])
@nox.parametrize("transformers", TRANSFORMERS_VERSIONS)
def tests_core(session: nox.Session, transformers: str) -> None:
    """Run core's tests and the cross-package tests (with every plugin installed)."""
    plugins = [f"plugins/{family}" for family in FAMILIES]
    # build + hatchling: tests/test_wheels.py builds every distribution.
    _install_stack(session, transformers, CORE, TESTKIT, *plugins, extra=("build", "hatchling"))
    session.run("pytest", "core/tests", "tests", *session.posargs, env=OFFLINE)


@nox.session(name="census", tags=["tests"])
@nox.parametrize("transformers", TRANSFORMERS_VERSIONS)
def census(session: nox.Session, transformers: str) -> None:
    """Scan the installed transformers for fused classes; defuse every model type that has one."""
    plugins = [f"plugins/{family}" for family in FAMILIES]
    _install_stack(session, transformers, CORE, TESTKIT, *plugins)
    session.run("pytest", "tests/test_census.py", *session.posargs, env=OFFLINE)


# Downstream tools, each in its own session (and virtualenv) with defuser installed in place of
# ModelCloud's Defuser: the umbrella distribution is installed with them, so their
# ``defuser>=0.0.28`` requirement is met by this checkout, and torch stays pinned.
DOWNSTREAM = {
    "gptqmodel": (("gptqmodel==7.6.0",), ("tests/downstream/test_gptqmodel.py", "tests/test_gptqmodel_paths.py")),
    "autoround": (("auto-round==0.16.1",), ("tests/downstream/test_autoround.py",)),
    "torchao": (("torchao==0.18.0",), ("tests/downstream/test_torchao.py",)),
    "peft": (("peft==0.21.2",), ("tests/downstream/test_peft.py", "tests/downstream/test_activation_capture.py")),
}


def _make_downstream_session(name: str) -> None:
    requirements, tests = DOWNSTREAM[name]

    def downstream(session: nox.Session) -> None:
        plugins = [f"plugins/{family}" for family in FAMILIES]
        _install_stack(session, _RELEASES["newest"], CORE, TESTKIT, *plugins, "packages/defuser", extra=requirements)
        # GPTQModel refuses fewer than 2 CPU workers for its loader pool (a 2-core machine gets 1).
        env = {**OFFLINE, "GPTQMODEL_CPU_WORKERS": "2"}
        session.run("pytest", "-p", "no:randomly", *tests, *session.posargs, env=env)

    downstream.__doc__ = f"End-to-end test with {', '.join(requirements)} on tiny models (CPU, newest transformers)."
    downstream.__name__ = name
    nox.session(name=name, tags=["downstream"])(downstream)


for _tool in DOWNSTREAM:
    _make_downstream_session(_tool)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint the whole repository with ruff (configuration in ruff.toml)."""
    session.install("ruff")
    session.run("ruff", "check", ".", *session.posargs)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel of every distribution into dist/ and check each wheel is there."""
    session.install("build", "hatchling")
    outdir = ROOT / "dist"
    outdir.mkdir(exist_ok=True)
    expected: list[tuple[str, str]] = []
    for path in _distribution_dirs():
        project = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        stem = f"{_normalized(project['name'])}-{project['version']}"
        # Drop artifacts of this exact version first, so a stale file cannot pass the check below.
        for stale in [*outdir.glob(f"{stem}-*.whl"), outdir / f"{stem}.tar.gz"]:
            stale.unlink(missing_ok=True)
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(outdir), str(path))
        expected.append((path.relative_to(ROOT).as_posix(), stem))

    missing = []
    for rel, stem in expected:
        wheels = sorted(outdir.glob(f"{stem}-*.whl"))
        if not wheels:
            missing.append(f"{rel}: no {stem}-*.whl")
        if not (outdir / f"{stem}.tar.gz").is_file():
            missing.append(f"{rel}: no {stem}.tar.gz")
        for wheel in wheels:
            session.log(f"built {wheel.name}")
    if missing:
        session.error("missing build artifacts in dist/: " + "; ".join(missing))
