"""Google Gemma 4 MoE: conformance of every claimed model type on the installed transformers."""

from defuser_gemma.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestGemma(FamilyConformance):
    cases, unavailable = cases_for(plugin)
