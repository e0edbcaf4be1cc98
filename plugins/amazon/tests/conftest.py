import pytest


@pytest.fixture(autouse=True)
def _restore(defuser_restore_patches):
    yield
