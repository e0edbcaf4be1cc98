"""Ai2 OLMoE, FlexOlmo: conformance of every claimed model type on the installed transformers."""

from defuser_allenai.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestAllenai(FamilyConformance):
    cases, unavailable = cases_for(plugin)
