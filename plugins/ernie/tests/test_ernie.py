"""Baidu ERNIE 4.5 MoE: conformance of every claimed model type on the installed transformers."""

from defuser_ernie.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestErnie(FamilyConformance):
    plugin = plugin
