"""Amazon: conformance of every claimed model type on the installed transformers."""

from defuser_amazon.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestAmazon(FamilyConformance):
    plugin = plugin
