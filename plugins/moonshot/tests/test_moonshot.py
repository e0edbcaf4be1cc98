"""Moonshot AI: conformance of every claimed model type on the installed transformers."""

from defuser_moonshot.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestMoonshot(FamilyConformance):
    plugin = plugin
