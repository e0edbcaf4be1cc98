"""Zyphra Zamba2, ZAYA: conformance of every claimed model type on the installed transformers."""

from defuser_testkit.conformance import FamilyConformance, xfail_for
from defuser_zyphra.hooks import plugin

# Found when pre-load tests were derived from the declarations (issue 15), on transformers
# 5.25.0; the tests stay visible as xfail until fixed.
_KNOWN = "transformers refuses to save the tiny config: ZAYA supports num_experts_per_tok=1 only"


class TestZyphra(FamilyConformance):
    plugin = plugin
    xfail = xfail_for(_KNOWN, ("zaya",), tests=("test_preload_patch_loads_both_layouts",))
