"""Inkling, Inkling 2: conformance of every claimed model type on the installed transformers."""

from defuser_inkling.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, xfail_for

# Found when pre-load tests were derived from the declarations (issue 15), on transformers
# 5.25.0; the tests stay visible as xfail until fixed.
_KNOWN = (
    "BUG (also before issue 15): after replace_fused_blocks, from_pretrained leaves the defused "
    "experts of the tiny model's class missing (randomly initialised; stock reload is exact)"
)


class TestInkling(FamilyConformance):
    plugin = plugin
    xfail = xfail_for(_KNOWN, ("inkling2_loop", "inkling2_loop_text"))
