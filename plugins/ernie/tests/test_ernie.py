"""Baidu ERNIE 4.5 MoE: conformance of every claimed model type on the installed transformers."""

from defuser_ernie.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, xfail_for

# Found when pre-load tests were derived from the declarations (issue 15), on transformers
# 5.25.0; the tests stay visible as xfail until fixed.
_KNOWN = (
    "BUG (also before issue 15): after replace_fused_blocks, from_pretrained leaves the defused "
    "experts of the tiny model's class missing (randomly initialised; stock reload is exact)"
)


class TestErnie(FamilyConformance):
    plugin = plugin
    xfail = xfail_for(_KNOWN, ("ernie4_5_vl_moe",))
