"""DeepSeek: conformance of every claimed model type on the installed transformers."""

from defuser_deepseek.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestDeepseek(FamilyConformance):
    cases, unavailable = cases_for(plugin)
