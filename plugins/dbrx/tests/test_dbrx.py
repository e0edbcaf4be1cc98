"""Databricks DBRX: conformance of every claimed model type on the installed transformers."""

from defuser_dbrx.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestDbrx(FamilyConformance):
    plugin = plugin
