"""The transformers versions defuser works with."""

from __future__ import annotations

import logging
from functools import lru_cache

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = [
    "MIN_TRANSFORMERS",
    "supported_transformers_installed",
    "transformers_supported",
    "transformers_version",
    "version_in",
]

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = "5.3.0"


@lru_cache(maxsize=1)
def transformers_version() -> Version | None:
    """Installed transformers version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Version(version("transformers"))
    except PackageNotFoundError:
        return None


def version_in(spec: str, found: Version | str | None) -> bool:
    """True when ``found`` satisfies the PEP 440 specifier ``spec`` (pre-releases allowed)."""
    if found is None:
        return False
    return SpecifierSet(spec).contains(Version(str(found)), prereleases=True)


def supported_transformers_installed() -> bool:
    """True when the installed transformers is 5.3.0 or newer."""
    found = transformers_version()
    return found is not None and found.release >= Version(MIN_TRANSFORMERS).release


def transformers_supported(caller: str) -> bool:
    """True for transformers >= 5.3.0; otherwise log a warning naming ``caller``."""
    found = transformers_version()
    if supported_transformers_installed():
        return True
    logger.warning("%s needs transformers>=%s, found %s; nothing done", caller, MIN_TRANSFORMERS, found or "none")
    return False
