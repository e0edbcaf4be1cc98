"""rednote dots: conformance of every claimed model type on the installed transformers."""

from defuser_rednote.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestRednote(FamilyConformance):
    plugin = plugin
