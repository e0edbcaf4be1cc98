"""Google Gemma 4 MoE: conformance of every claimed model type on the installed transformers."""

from defuser_gemma.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, xfail_for

# Found when pre-load tests were derived from the declarations (issue 15), on transformers
# 5.25.0; the tests stay visible as xfail until fixed.
_KNOWN = "the tiny config does not reload in stock transformers either: mismatched sizes"


class TestGemma(FamilyConformance):
    plugin = plugin
    xfail = xfail_for(_KNOWN, ("diffusion_gemma", "diffusion_gemma_text", "gemma4", "gemma4_text"))
