"""The error a conversion raises: one home, so the engine and the public API share it."""

from __future__ import annotations

__all__ = ["ConversionError", "DeclarationError", "DeclarationMismatch", "PluginError"]


class ConversionError(RuntimeError):
    """Defusing failed or was refused; the message names the module path, its class and why.

    A module refused before conversion (an unknown structure) leaves the whole model as it
    was; a module whose defusion failed (a plugin error, out of memory, the run-time
    self-check) is put back as it was.
    """


class DeclarationMismatch(RuntimeError):
    """A plugin's declaration does not fit the installed transformers (a class it declares
    undecorated is decorated now, an attribute it reads is gone).  Raised from detection; the
    plugin manager then lets the generic engine take the module, or refuses it."""


class DeclarationError(ValueError):
    """A plugin's declaration is wrong in itself: an unknown field, a value of the wrong type,
    an impossible combination, a tensor or activation name the declared class does not have.
    The message names the plugin, the class and the field.  Raised when the plugin is built
    (``Family(...)``, so the plugin fails to load) or when a module of the class is first
    detected (``convert_model`` then refuses it before changing anything)."""


class PluginError(RuntimeError):
    """A plugin failed to load or a hook of it raised; the message names plugin and hook."""
