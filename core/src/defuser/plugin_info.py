"""What a plugin says about itself: the data behind ``defuser plugins`` and the README table."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PluginInfo", "TypeSupport"]


@dataclass(frozen=True)
class TypeSupport:
    """How one model type is handled: after-load conversion, before-load patching, notes."""

    model_type: str
    preload: bool = False
    notes: str = ""
    min_transformers: str | None = None


@dataclass(frozen=True)
class PluginInfo:
    """Self-description a plugin returns from ``defuser_plugin_info``."""

    name: str
    model_types: tuple[TypeSupport, ...] = ()
    transformers: str = ">=5.3.0"
    core: str = ">=0.1,<1"
    priority: int = 0
    description: str = ""
    distribution: str | None = field(default=None, compare=False)

    def claims(self, model_type: str | None) -> bool:
        """True when ``model_type`` is one of the plugin's declared model types."""
        return model_type is not None and any(t.model_type == model_type for t in self.model_types)

    def support_for(self, model_type: str) -> TypeSupport | None:
        """The declaration for ``model_type``, or None."""
        return next((t for t in self.model_types if t.model_type == model_type), None)
