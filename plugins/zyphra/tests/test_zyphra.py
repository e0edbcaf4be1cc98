"""Zyphra Zamba2, ZAYA: conformance of every claimed model type on the installed transformers."""

from defuser_testkit.conformance import FamilyConformance
from defuser_zyphra.hooks import plugin


class TestZyphra(FamilyConformance):
    plugin = plugin
