"""NVIDIA Nemotron-H: conformance of every claimed model type on the installed transformers."""

from defuser_nemotron.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, xfail_for

# Found when pre-load tests were derived from the declarations (issue 15), on transformers
# 5.25.0; the tests stay visible as xfail until fixed.
_KNOWN = (
    "the tiny config's grouped-query heads do not survive transformers' own reverse conversion "
    "(tests/test_save_reload.py builds it with equal heads)"
)


class TestNemotron(FamilyConformance):
    plugin = plugin
    xfail = xfail_for(_KNOWN, ("nemo_speechlm",))
