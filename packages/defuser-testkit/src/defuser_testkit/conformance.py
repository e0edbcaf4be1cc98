"""A conformance suite plugin authors subclass, one subclass per family.

    class TestAcme(FamilyConformance):
        plugin = plugin  # the plugin's Family: cases, unavailable and preload follow from it
        generate = {"acme_moe"}

or, spelled out (each attribute set in the class wins over the one derived from ``plugin``)::

    class TestQwen(FamilyConformance):
        cases = {"qwen3_moe": lambda: build_tiny_model("qwen3_moe")}
        preload = {"qwen3_moe"}
        generate = {"qwen3_moe"}

Every test is parametrized over the model types it applies to (``model_type`` argument):
``cases`` (conversion, meta device, ``max_layers``, ``filter``, save/reload), ``preload``
(pre-load patching, and reloading a saved defused model into it) and ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from packaging.version import Version
from torch import nn

from defuser import convert_model, find_candidates
from defuser_testkit import checks
from defuser_testkit.tiny import build_tiny_model, tiny_inputs

__all__ = ["FamilyConformance", "cases_for", "over", "preload_for", "xfail_for"]


def _type_known(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def cases_for(plugin: Any) -> tuple[dict[str, Callable[[], nn.Module]], dict[str, str]]:
    """Tiny-model factories for every model type ``plugin`` declares, and the types left out
    on the installed transformers with the reason (reported as skips, never silent).

    A plugin whose own package registers its model types with transformers (``Family``'s
    ``model_code``) has them registered first, as the ``defuser`` command does."""
    import transformers

    register = getattr(plugin, "defuser_register_models", None)
    if register is not None:
        register()
    version = transformers.__version__
    cases: dict[str, Callable[[], nn.Module]] = {}
    unavailable: dict[str, str] = {}
    for support in plugin.info.model_types:
        model_type = support.model_type
        if not _type_known(model_type):
            unavailable[model_type] = f"model type {model_type!r} does not exist in transformers {version}"
        elif support.min_transformers and Version(version) < Version(support.min_transformers):
            unavailable[model_type] = (
                f"{model_type!r} is tested from transformers {support.min_transformers} on (installed {version})"
            )
        else:
            cases[model_type] = partial(build_tiny_model, model_type)
    return cases, unavailable


def preload_for(plugin: Any, model_types: Iterable[str]) -> set[str]:
    """The ``model_types`` that ``plugin`` patches before load on the installed transformers:
    declared with ``preload`` (the default) and not before their ``min_transformers`` or
    ``preload_min_transformers`` (a case a plugin builds by hand may exist on older releases
    the declaration does not claim)."""
    import transformers

    version = Version(transformers.__version__)
    found = set()
    for model_type in model_types:
        support = plugin.info.support_for(model_type)
        if support is None or not support.preload:
            continue
        first = [Version(v) for v in (support.min_transformers, support.preload_min_transformers) if v]
        if any(version < release for release in first):
            continue
        found.add(model_type)
    return found


def xfail_for(
    reason: str,
    model_types: Iterable[str],
    tests: Iterable[str] = ("test_saves_and_reloads", "test_preload_patch_loads_both_layouts"),
) -> dict[str, str]:
    """``FamilyConformance.xfail`` entries: each of ``tests`` on each of ``model_types`` is
    expected to fail for ``reason`` (by default the two tests that reload a checkpoint)."""
    return {f"{test}[{model_type}]": reason for test in tests for model_type in model_types}


def over(group: str) -> Callable:
    """Mark a conformance test to run over ``cases`` keys in ``group`` (an attribute name)."""

    def mark(function: Callable) -> Callable:
        function._defuser_over = group  # type: ignore[attr-defined]  # read back by the suite
        return function

    return mark


class FamilyConformance:
    """Standard checks for every model type of a plugin.

    A subclass setting ``plugin`` (its :class:`defuser.plugin.Family`) gets ``cases`` and
    ``unavailable`` from :func:`cases_for` and ``preload`` from :func:`preload_for`, unless it
    sets them itself.
    """

    plugin: ClassVar[Any] = None
    cases: ClassVar[dict[str, Callable[[], nn.Module]]] = {}
    # model type -> why it is not tested here (shown as a skip)
    unavailable: ClassVar[dict[str, str]] = {}
    preload: ClassVar[set[str]] = set()
    generate: ClassVar[set[str]] = set()
    # "test_name[model_type]" (the id pytest prints) -> why it is expected to fail: marked
    # xfail (not strict: a release where it passes shows XPASS), never skipped silently.
    xfail: ClassVar[dict[str, str]] = {}
    extra_checkpoints: ClassVar[dict[str, Callable[[nn.Module, Path], dict[str, Path]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if own.get("plugin") is None:
            return
        if "cases" not in own:
            cls.cases, derived_unavailable = cases_for(cls.plugin)
            if "unavailable" not in own:
                cls.unavailable = derived_unavailable
        if "preload" not in own:
            cls.preload = preload_for(cls.plugin, cls.cases)

    def inputs(self, model_type: str) -> dict[str, torch.Tensor]:
        """Inputs for ``model_type`` (override for models that need more than token ids)."""
        return tiny_inputs(self.cases[model_type]())

    @over("cases")
    def test_converts_with_equal_outputs(self, model_type: str) -> None:
        checks.assert_converts_equal(self.cases[model_type], self.inputs(model_type))

    @over("cases")
    def test_meta_device(self, model_type: str) -> None:
        checks.assert_meta_conversion(self.cases[model_type])

    @over("cases")
    def test_max_layers_converts_first_layers_only(self, model_type: str) -> None:
        checks.assert_max_layers(self.cases[model_type], self.inputs(model_type))

    @over("cases")
    def test_filter_excludes_and_includes(self, model_type: str) -> None:
        model = self.cases[model_type]()
        inputs = self.inputs(model_type)
        reference = checks.model_output(model, inputs)
        paths = [c.path for c in find_candidates(model)]
        assert convert_model(model, filter=["-:.*"]) is False
        assert [c.path for c in find_candidates(model)] == paths
        target = paths[-1]
        assert convert_model(model, filter=[f"+:^{target}$", "-:layers\\.0\\."]) is True
        left = [c.path for c in find_candidates(model)]
        assert left == [p for p in paths if p != target], f"only {target} should have been converted"
        difference = (checks.model_output(model, inputs) - reference).abs().max().item()
        assert difference <= checks.ATOL

    @over("cases")
    def test_saves_and_reloads(self, model_type: str, tmp_path: Path) -> None:
        # Types in ``preload`` also reload into the patched classes (outputs compared); the
        # rest check the checkpoint's tensors against the defused state dict (cheap).
        inputs = self.inputs(model_type) if model_type in self.preload else None
        try:
            checks.assert_saves_and_reloads(self.cases[model_type], model_type, tmp_path, inputs)
        except checks.TinyConfigInvalid as error:
            pytest.skip(str(error))

    @over("generate")
    def test_generate_same_tokens(self, model_type: str) -> None:
        checks.assert_generate_same(self.cases[model_type], self.inputs(model_type))

    @over("preload")
    def test_preload_patch_loads_both_layouts(self, model_type: str, tmp_path: Path) -> None:
        checks.assert_preload_loads_both_layouts(
            self.cases[model_type],
            model_type,
            self.inputs(model_type),
            tmp_path,
            extra_checkpoints=self.extra_checkpoints.get(model_type),
        )
