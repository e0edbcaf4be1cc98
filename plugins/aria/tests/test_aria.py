"""Rhymes Aria: conformance of every claimed model type on the installed transformers."""

from defuser_aria.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestAria(FamilyConformance):
    plugin = plugin
