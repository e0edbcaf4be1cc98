"""DeepSeek: conformance of every claimed model type on the installed transformers."""

from defuser_deepseek.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestDeepseek(FamilyConformance):
    plugin = plugin
