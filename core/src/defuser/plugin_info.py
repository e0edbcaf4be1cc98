"""What a plugin says about itself: the data behind ``defuser plugins`` and the README table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DENSE_KEPT",
    "DENSE_SPLIT",
    "DENSE_WAYS",
    "RELOAD_NONE",
    "RELOAD_PATCHED",
    "RELOAD_STOCK",
    "RELOAD_WAYS",
    "PluginInfo",
    "TinyModel",
    "TypeSupport",
]

# What happens to the dense MLPs of a model type whose gate and up projections share one
# ``nn.Linear`` (``gate_up_proj``, granite's ``input_linear``): split into ``gate_proj`` and
# ``up_proj`` (the classes its plugin names in ``dense_classes``: where ModelCloud's Defuser
# splits them, or GPTQModel's definitions name the halves), or kept as the one Linear it
# already is.  Empty: the type has no such MLP.
DENSE_SPLIT = "split"
DENSE_KEPT = "kept"
DENSE_WAYS = ("", DENSE_SPLIT, DENSE_KEPT)

# How a checkpoint saved after ``convert_model`` (or from a model built after
# ``replace_fused_blocks``) loads again: plain transformers loads it into the stock fused model
# (the default: defuser saves what stock transformers saves for the fused model, see
# defuser.engine.save); or only a model built with ``replace_fused_blocks`` first loads it; or
# neither works (``reload_blocker`` says why).  Every first-party type declares stock.
RELOAD_STOCK = "stock"
RELOAD_PATCHED = "replace_fused_blocks"
RELOAD_NONE = "none"
RELOAD_WAYS = (RELOAD_STOCK, RELOAD_PATCHED, RELOAD_NONE)


@dataclass(frozen=True)
class TypeSupport:
    """How one model type is handled: after-load conversion, before-load patching (``preload``,
    on by default: ``replace_fused_blocks`` patches the type; ``preload=False`` opts out, and
    ``preload_min_transformers`` names the first release it works on when older ones cannot),
    how a checkpoint saved from the defused model reloads (``reload``, one of
    :data:`RELOAD_WAYS`; ``reload_blocker`` says why when it cannot; ``stock_reload_from``: the
    release from which stock transformers reloads it too), the oldest transformers the type is
    tested on (``min_transformers``), what happens to its fused dense gate-up Linears
    (``dense``, one of :data:`DENSE_WAYS`), ``notes``.  :mod:`defuser.plugin` documents each
    field."""

    model_type: str
    # True since core 0.1: every first-party type patches before load.  Before, the default was
    # False and a plugin had to ask; a type that cannot be patched now says preload=False.
    preload: bool = True
    notes: str = ""
    min_transformers: str | None = None
    reload: str = RELOAD_STOCK
    reload_blocker: str = ""
    preload_min_transformers: str | None = None
    stock_reload_from: str | None = None
    dense: str = ""

    def __post_init__(self) -> None:
        if self.stock_reload_from is not None and self.reload == RELOAD_STOCK:
            raise ValueError(f"{self.model_type}: stock_reload_from says when a non-stock reload becomes stock")
        if self.dense not in DENSE_WAYS:
            raise ValueError(f"{self.model_type}: dense must be one of {DENSE_WAYS}, got {self.dense!r}")
        if self.reload not in RELOAD_WAYS:
            raise ValueError(f"{self.model_type}: reload must be one of {RELOAD_WAYS}, got {self.reload!r}")
        if self.reload == RELOAD_PATCHED and not self.preload:
            raise ValueError(f"{self.model_type}: reload={RELOAD_PATCHED!r} needs preload=True")
        if (self.reload == RELOAD_NONE) != bool(self.reload_blocker):
            raise ValueError(f"{self.model_type}: reload_blocker says why, and only when reload={RELOAD_NONE!r}")

    def reload_on(self, release: object) -> str:
        """How a saved defused model reloads on transformers ``release``: :attr:`reload`, or
        stock from :attr:`stock_reload_from` on."""
        from packaging.version import Version

        if self.stock_reload_from is not None and Version(str(release)) >= Version(self.stock_reload_from):
            return RELOAD_STOCK
        return self.reload


@dataclass(frozen=True)
class TinyModel:
    """What building a tiny random model of one model type needs beyond core's generic shrinking
    (``defuser demo``, the self-check's stand-in model, the testkit and the census tests).

    ``config``: attribute -> value set on the shrunk config of that model type (a dotted name
    sets an attribute of a sub-config: ``"attn_config.rope_theta"``); each is set even when the
    default config lacks the attribute.  ``inputs``: ``"module:function"`` building the forward
    inputs as ``function(model, batch, length, generator) -> dict`` for a model that token ids
    alone cannot drive (imported when first used, so declaring it costs no import).
    ``embeds_only``: the model cannot embed ids itself; it is fed their embeddings.
    ``multimodal_rope``: the model reads a default ``mrope_section`` when its config has none,
    so the sections are rescaled to the shrunk head.
    """

    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    inputs: str = ""
    embeds_only: bool = False
    multimodal_rope: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.config, Mapping) or not all(isinstance(name, str) and name for name in self.config):
            raise ValueError(f"TinyModel.config maps attribute names to values, got {self.config!r}")
        object.__setattr__(self, "config", dict(self.config))  # a copy: the caller's dict may change
        module, colon, function = self.inputs.partition(":")
        if self.inputs and not (colon and module and function.isidentifier()):
            raise ValueError(f"TinyModel.inputs is 'module:function', got {self.inputs!r}")


@dataclass(frozen=True)
class PluginInfo:
    """Self-description a plugin returns from ``defuser_plugin_info``.

    ``tested_on`` lists the transformers releases the plugin was tested on (``"5.25.0"``);
    ``defuser plugins`` says "untested on X" for an installed release outside it.
    ``tiny_models`` maps a model type (a claimed one, or a sub-model of one) to the
    :class:`TinyModel` recipe its tiny random models need.
    """

    name: str
    model_types: tuple[TypeSupport, ...] = ()
    transformers: str = ">=5.3.0"
    core: str = ">=0.1,<1"
    priority: int = 0
    description: str = ""
    distribution: str | None = field(default=None, compare=False)
    tested_on: tuple[str, ...] = ()
    tiny_models: Mapping[str, TinyModel] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        from packaging.version import InvalidVersion, Version

        for model_type, recipe in self.tiny_models.items():
            if not isinstance(recipe, TinyModel):
                raise ValueError(f"plugin {self.name!r}: tiny_models[{model_type!r}] is {recipe!r}, not a TinyModel")
        object.__setattr__(self, "tiny_models", dict(self.tiny_models))

        for release in self.tested_on:
            try:
                Version(release)
            except (InvalidVersion, TypeError):
                raise ValueError(f"plugin {self.name!r}: tested_on holds {release!r}, not a release version") from None

    def tested_with(self, release: object) -> bool:
        """True when the transformers ``release`` is one the plugin was tested on."""
        from packaging.version import Version

        return release is not None and any(Version(str(release)) == Version(tested) for tested in self.tested_on)

    def claims(self, model_type: str | None) -> bool:
        """True when ``model_type`` is one of the plugin's declared model types."""
        return model_type is not None and any(t.model_type == model_type for t in self.model_types)

    def support_for(self, model_type: str) -> TypeSupport | None:
        """The declaration for ``model_type``, or None."""
        return next((t for t in self.model_types if t.model_type == model_type), None)
