"""Ai2 OLMoE, FlexOlmo: conformance of every claimed model type on the installed transformers."""

from defuser_allenai.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestAllenai(FamilyConformance):
    plugin = plugin
