"""StepFun Step 3.5 / 3.7: conformance of every claimed model type on the installed transformers."""

from defuser_step.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestStep(FamilyConformance):
    plugin = plugin
