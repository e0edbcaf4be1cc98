"""Databricks DBRX: conformance of every claimed model type on the installed transformers."""

from defuser_dbrx.hooks import plugin
from defuser_testkit.conformance import FamilyConformance, cases_for


class TestDbrx(FamilyConformance):
    cases, unavailable = cases_for(plugin)
