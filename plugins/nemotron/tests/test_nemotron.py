"""NVIDIA Nemotron-H: conformance of every claimed model type on the installed transformers."""

from defuser_nemotron.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestNemotron(FamilyConformance):
    cases, unavailable = cases_for(plugin)
