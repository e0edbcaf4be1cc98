"""Every hook a defuser plugin can implement, grouped by the phase that calls it.

Plugins register under the ``defuser`` entry-point group and mark their functions with
:data:`defuser.plugin.hookimpl`.  Specs only ever grow: new arguments are added, none renamed, so a
plugin written against an older core keeps working (pluggy passes only the arguments a
hook implementation names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from defuser.engine.candidates import Candidate
    from defuser.engine.preload import PreloadPlan
    from defuser.plugin_info import PluginInfo

__all__ = [
    "PROJECT_NAME",
    "defuser_defuse_candidate",
    "defuser_detect_candidate",
    "defuser_patch_model",
    "defuser_plugin_info",
    "defuser_preload_plan",
    "defuser_register_models",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "defuser"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- registration -----------------------------------------------------------------------


@hookspec
def defuser_plugin_info() -> PluginInfo:
    """Describe the plugin: the model types it claims and the versions it supports.

    Called once by the plugin manager right after the plugin is loaded.  The returned
    :class:`defuser.plugin.PluginInfo` names the plugin, lists ``model_types`` it claims (a claim
    decides which plugin handles a model type when several could), the model types it can
    patch before load, its ``priority`` (higher wins a contested model type; ties go to the
    smaller name) and the ``transformers`` and ``core`` version ranges it supports.  A plugin
    outside either range is skipped with a message naming both versions.
    """


@hookspec
def defuser_register_models() -> list[str] | None:
    """Make the transformers model classes the plugin's family ships itself known to transformers.

    A family whose config and model classes live in the author's own package (registered with
    ``AutoConfig.register`` / ``AutoModelForCausalLM.register`` when that package is imported)
    is unknown to transformers until something imports it.  Called once per plugin manager by
    the ``defuser`` command, before it resolves a model type by name or reads a config, so ``demo``,
    ``inspect``, ``verify`` and ``convert`` work on such a family.  Import the package (a
    :class:`defuser.plugin.Family` does it for the modules named in ``model_code``) and return
    the model types made known, or ``None``.  The entry-point module itself stays cheap: import
    the model code here, not at its top.
    """


# --- phase 1: detection -----------------------------------------------------------------


@hookspec(firstresult=True)
def defuser_detect_candidate(module: nn.Module, path: str, model_type: str | None) -> Candidate | None:
    """Decide whether one module of a loaded model is a fused block this plugin can defuse.

    Called by ``convert_model`` for every module of the model, in ``named_modules`` order.
    ``module`` is the module, ``path`` its full dotted path (``model.layers.0.mlp.experts``)
    and ``model_type`` the ``config.model_type`` of the closest enclosing pretrained model
    (a thinker, talker or text sub-model has its own).  Return a
    :class:`defuser.plugin.Candidate` that names this plugin, or ``None`` when the
    module is not yours; a candidate whose ``refusal`` says why marks a fused module that must
    not be defused (``convert_model`` then raises before changing anything).  When the plugin
    that owns the model type raises, its declaration is taken not to fit the installed
    transformers and the generic engine is asked instead.  Stops at first non-None result.
    """


# --- phase 2: pre-load patching ---------------------------------------------------------


@hookspec(firstresult=True)
def defuser_preload_plan(model_type: str) -> PreloadPlan | None:
    """Say how to build ``model_type`` with defused blocks before its weights are loaded.

    Called by ``replace_fused_blocks(model_type)``.  Return a
    :class:`defuser.plugin.PreloadPlan`: the transformers modeling modules whose
    decorated experts classes are replaced, extra dense fused MLP classes to split, and
    checkpoint key renames (legacy per-expert names).  Core turns it into transformers'
    ``register_patch_mapping`` and ``register_checkpoint_conversion_mapping`` entries.
    Return ``None`` when the model type is not yours or cannot be patched.
    Stops at first non-None result.
    """


# --- phase 3: runtime defusion ----------------------------------------------------------


@hookspec(firstresult=True)
def defuser_defuse_candidate(candidate: Candidate) -> nn.Module | None:
    """Build the defused replacement of one detected candidate.

    Called by ``convert_model`` once per candidate that passed ``filter`` and
    ``max_layers``.  Return the module that takes the candidate's place in its parent (it
    may be ``candidate.module`` itself, changed in place) or ``None`` to leave the job to the
    next plugin; core's generic engine answers last for every standard layout.  Raise to
    abort: core restores the module and re-raises with the module path.
    Stops at first non-None result.
    """


@hookspec
def defuser_patch_model(model: nn.Module, model_type: str) -> list[str] | None:
    """Give a model the runtime behaviour its family needs once it is defused.

    Called by ``convert_model`` once per call, after the conversion (whether or not anything
    was defused there: a model built defused by ``replace_fused_blocks`` needs it too), with the
    model it was given and that model's ``config.model_type``; only the plugin owning that model
    type is asked.  Patch ``model`` in place (ModelCloud's Defuser gives Qwen3-Omni-MoE a text
    ``forward`` and ``generate(return_audio=False)``) and return the names of what was patched
    (empty or ``None`` when nothing was).  Patching twice must be harmless.
    """
