"""Single-model families: conformance of every claimed model type on the installed transformers."""

from defuser_community.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestCommunity(FamilyConformance):
    cases, unavailable = cases_for(plugin)
