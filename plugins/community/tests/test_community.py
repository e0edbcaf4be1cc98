"""Single-model families: conformance of every claimed model type on the installed transformers."""

from defuser_community.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestCommunity(FamilyConformance):
    plugin = plugin
