"""Shared by every first-party plugin's tests (``pytest plugins/<family>/tests``, the nox
``tests-<family>`` sessions, or ``pytest plugins``): pytest loads this file for any test under
``plugins/`` because the repository's ``pytest.ini`` makes the root the rootdir."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore(defuser_restore_patches: None) -> Iterator[None]:
    """Every test starts and ends with stock transformers classes: pre-load patches are undone."""
    yield
