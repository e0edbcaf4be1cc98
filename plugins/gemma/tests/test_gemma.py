"""Google Gemma 4 MoE: conformance of every claimed model type on the installed transformers."""

from defuser_gemma.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestGemma(FamilyConformance):
    plugin = plugin
