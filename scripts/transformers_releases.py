"""The transformers releases the test matrix runs against: the one place that names them.

    python3 scripts/transformers_releases.py            # "oldest 5.3.0" and "newest X.Y.Z" lines
    python3 scripts/transformers_releases.py newest     # just the newest release's version

``oldest`` is the oldest release defuser supports (``MIN_TRANSFORMERS`` in core's ``compat.py``).
``newest`` is the newest final release the package registry serves *now*, asked at run time, so
a new transformers release is tested the first time the suite runs after it ships.  When the
registry cannot be asked, ``LAST_KNOWN_GOOD`` (the newest release the suite last passed on) is
used and a warning says so on stderr.  Standard library only: nox and the shell scripts use it
before any environment exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

__all__ = ["LAST_KNOWN_GOOD", "newest", "oldest", "releases"]

ROOT = Path(__file__).resolve().parents[1]
# The newest release the whole suite was last seen passing on (a fallback, never the default).
LAST_KNOWN_GOOD = "5.25.0"

_COMPAT = ROOT / "core" / "src" / "defuser" / "compat.py"


def oldest() -> str:
    """The oldest supported release, read from core so the two never disagree."""
    match = re.search(r'^MIN_TRANSFORMERS = "([^"]+)"', _COMPAT.read_text(encoding="utf-8"), re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: no MIN_TRANSFORMERS in {_COMPAT}")
    return match.group(1)


def newest(python: str = sys.executable) -> str:
    """The newest final transformers release the configured package index serves."""
    try:
        result = subprocess.run(
            [python, "-m", "pip", "index", "versions", "transformers", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"warning: cannot ask the package index ({error}); using {LAST_KNOWN_GOOD}", file=sys.stderr)
        return LAST_KNOWN_GOOD
    match = re.search(r"^transformers \(([^)]+)\)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or match is None:
        reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        print(
            f"warning: the package index gave no transformers release ({reason}); using {LAST_KNOWN_GOOD}",
            file=sys.stderr,
        )
        return LAST_KNOWN_GOOD
    return match.group(1)


def releases() -> dict[str, str]:
    """``{"oldest": ..., "newest": ...}``, oldest first."""
    return {"oldest": oldest(), "newest": newest()}


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["oldest", "newest"]
    unknown = [name for name in wanted if name not in ("oldest", "newest")]
    if unknown:
        raise SystemExit(f"usage: {Path(__file__).name} [oldest] [newest] (unknown: {', '.join(unknown)})")
    found = {"oldest": oldest, "newest": newest}
    for name in wanted:
        value = found[name]()
        print(value if len(wanted) == 1 else f"{name} {value}")
