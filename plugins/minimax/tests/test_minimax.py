"""MiniMax: conformance of every claimed model type on the installed transformers."""

from defuser_minimax.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestMinimax(FamilyConformance):
    plugin = plugin
