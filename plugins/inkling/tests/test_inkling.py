"""Inkling, Inkling 2: conformance of every claimed model type on the installed transformers."""

from defuser_inkling.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestInkling(FamilyConformance):
    plugin = plugin
