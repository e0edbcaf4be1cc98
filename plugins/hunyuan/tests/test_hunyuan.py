"""Tencent Hunyuan: conformance of every claimed model type on the installed transformers."""

from defuser_hunyuan.hooks import plugin
from defuser_testkit.conformance import FamilyConformance


class TestHunyuan(FamilyConformance):
    plugin = plugin
