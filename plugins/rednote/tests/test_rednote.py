"""rednote dots: conformance of every claimed model type on the installed transformers."""

from defuser_rednote.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestRednote(FamilyConformance):
    cases, unavailable = cases_for(plugin)
