"""``defuser new-plugin``: write a working third-party plugin distribution to start from.

The layout is the first-party plugins' (``plugins/<family>/``): a hatchling ``pyproject.toml``
declaring the ``defuser`` entry point, ``src/defuser_<name>/hooks.py`` with a
:class:`~defuser.plugin.Family` imported from :mod:`defuser.plugin` (the stable module for
plugins), ``py.typed``, a conformance test on the testkit and a README.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["PLUGIN_NAME_PATTERN", "check_plugin_name", "new_plugin"]

# An entry-point name that is also the tail of an importable package name (defuser_<name>).
PLUGIN_NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
# Names core uses itself: a plugin registered under one would shadow it.
_RESERVED_NAMES = frozenset({"generic", "core", "testkit"})


def check_plugin_name(name: str) -> str:
    """``name`` when it can name a plugin (lower-case letters, digits and single ``_``, starting
    with a letter, not a name core uses); else raises ``ValueError`` saying why."""
    if not PLUGIN_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid plugin name {name!r}: use lower-case letters, digits and single '_', "
            "starting with a letter (it names the entry point and the package defuser_<name>)"
        )
    if name in _RESERVED_NAMES:
        raise ValueError(f"invalid plugin name {name!r}: defuser uses that name itself")
    return name


def _core_requirement() -> str:
    """``defuser-core>=X.Y,<X+1`` for the installed core (a range, never a pin)."""
    try:
        major, minor = (int(part) for part in version("defuser-core").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        major, minor = 0, 1
    return f"defuser-core>={major}.{minor},<{major + 1}"


def _files(name: str, model_types: Sequence[str]) -> dict[str, str]:
    distribution = f"defuser-{name.replace('_', '-')}"
    package = f"defuser_{name}"
    class_name = "Test" + "".join(part.capitalize() for part in name.split("_"))
    if model_types:
        supports = "".join(f'        TypeSupport("{model_type}"),\n' for model_type in model_types)
    else:
        supports = '        # TypeSupport("my_model_type"),  # a key of transformers.CONFIG_MAPPING\n'
    listed = ", ".join(model_types) or "(none yet)"
    pyproject = f"""[build-system]
requires = ["hatchling>=1.24"]
build-backend = "hatchling.build"

[project]
name = "{distribution}"
version = "0.1.0"
description = "defuser plugin: {name}"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["{_core_requirement()}"]

[project.optional-dependencies]
test = ["defuser-testkit", "pytest>=7"]

[project.entry-points.defuser]
{name} = "{package}.hooks:plugin"

[tool.hatch.build.targets.wheel]
packages = ["src/{package}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""
    hooks = f'''"""{name}: the model types this plugin claims, and what differs from the generic engine."""

from defuser.plugin import Family, TypeSupport

__all__ = ["plugin"]

# hooks.py is imported whenever defuser loads its plugins: import only defuser.plugin here
# (no torch, no transformers.models.*).  Each type patches before load unless preload=False.
plugin = Family(
    name="{name}",
    description="{name}",
    model_types=[
{supports}    ],
    # Layouts the generic engine cannot infer go here (see defuser.plugin, docs/writing-a-plugin.md):
    # experts_classes, parallel_classes, dense_classes, key_renames, model_patches, ...
    # Model types your own package registers with transformers: model_code=["your_package"].
    # The transformers releases the tests pass on; `defuser plugins` flags the others.
    tested_on=[],
)
'''
    test = f'''"""{name}: conformance of every claimed model type on the installed transformers."""

import pytest
from defuser.plugin import isolated_plugins
from defuser_testkit.conformance import FamilyConformance

from {package}.hooks import plugin


@pytest.fixture(autouse=True)
def _this_plugin_alone(defuser_restore_patches):
    """Convert with this plugin (and core's generic engine) only, installed or not."""
    with isolated_plugins(plugin):
        yield


class {class_name}(FamilyConformance):
    plugin = plugin  # cases, skips and pre-load tests follow from its declarations
'''
    readme = f"""# {distribution}

defuser plugin `{name}` for the model types {listed}: see `src/{package}/hooks.py` for the
model types it claims and how each is handled.

```sh
# defuser-core and defuser-testkit come from a defuser checkout (not PyPI):
# pip install -e <checkout>/core -e <checkout>/packages/defuser-testkit
pip install -e . pytest
pytest                 # conformance of every claimed model type on the installed transformers
defuser plugins        # lists {name} once installed (entry point group "defuser")
```
"""
    return {
        "pyproject.toml": pyproject,
        "README.md": readme,
        f"src/{package}/__init__.py": f'"""defuser plugin: {name}."""\n',
        f"src/{package}/hooks.py": hooks,
        f"src/{package}/py.typed": "",
        f"tests/test_{name}.py": test,
    }


def new_plugin(name: str, model_types: Sequence[str] = (), destination: str | Path | None = None) -> Path:
    """Write the plugin distribution ``defuser-<name>`` claiming ``model_types`` into
    ``destination`` (default ``./defuser-<name>``), which must not exist; returns it.

    Raises ``ValueError`` for an invalid name or an existing destination.  The files are
    written beside the destination and renamed into place, so a failure leaves nothing.
    """
    check_plugin_name(name)
    target = Path(destination) if destination is not None else Path.cwd() / f"defuser-{name.replace('_', '-')}"
    if target.exists():
        raise ValueError(f"{target} already exists: choose another --dest")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for relative, text in _files(name, list(dict.fromkeys(model_types))).items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
