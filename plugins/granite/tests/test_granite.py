"""IBM Granite MoE: conformance of every claimed model type on the installed transformers."""

from defuser_granite.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestGranite(FamilyConformance):
    plugin = plugin
