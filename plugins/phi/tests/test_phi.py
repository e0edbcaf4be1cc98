"""Microsoft Phi: conformance of every claimed model type on the installed transformers."""

from defuser_phi.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestPhi(FamilyConformance):
    plugin = plugin
