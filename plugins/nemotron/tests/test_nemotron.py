"""NVIDIA Nemotron-H: conformance of every claimed model type on the installed transformers."""

from defuser_nemotron.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestNemotron(FamilyConformance):
    plugin = plugin
