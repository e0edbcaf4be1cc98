"""Everything a defuser plugin imports: the one stable module for plugin authors.

Stable modules are ``defuser`` (the conversion API) and ``defuser.plugin`` (this one); every
other module of defuser is internal and may change in any release.  Importing this module
imports neither torch nor transformers, so a plugin's ``hooks.py`` that imports only from here
stays cheap to load; :class:`PreloadPlan`, :class:`DefusedExperts`, :func:`layer_index` and the
tiny-model helpers load torch on first access.

A plugin is usually one declaration::

    from defuser.plugin import DenseLayout, Family, TypeSupport

    plugin = Family(
        name="acme",
        model_types=[TypeSupport("acme_moe"), TypeSupport("acme_vl_moe", notes="vision tower kept")],
        dense_classes={"AcmeMLP": DenseLayout()},
        tested_on=["5.25.0"],
    )

published as ``[project.entry-points.defuser] acme = "defuser_acme.hooks:plugin"``.

:class:`Family` declarations
----------------------------
``name``
    The plugin's name (``defuser plugins`` shows it; warnings and errors name it).
``model_types``
    One :class:`TypeSupport` per ``config.model_type`` the plugin claims.
``dense_classes``
    Dense MLP class name -> :class:`DenseLayout`, for fused gate-up ``nn.Linear`` layers that
    shape detection does not find (another attribute name, up half first).
``experts_classes``
    Class name of an experts module transformers does *not* decorate with
    ``@use_experts_implementation`` -> :class:`ExpertsDecl` (or a dict of the same
    :class:`ExpertsLayout` field values, without ``num_experts``, which is read from the
    tensors; an unknown field or an impossible combination is a :class:`DeclarationError`
    when the Family is built).  A value may be a callable taking the
    experts module and returning the value (read per instance).  Ignored, with a log line,
    once a transformers release decorates the class.
``parallel_classes``
    Class name -> :class:`ParallelLayout`, for stacked per-expert projections that the parent
    module routes (``forward(inputs, group_sizes)``).
``layout_overrides``
    Class name of a decorated experts class (or a subclass overriding ``forward``) -> a
    :class:`LayoutOverride` (or a dict) of the :class:`ExpertsLayout` fields its decorator's
    flags get wrong or do not name.
``key_renames``
    Model type -> ``(source regex, target)`` pairs renaming legacy checkpoint keys on a
    pre-load patched load.
``legacy_projection_names``
    Model type -> legacy per-expert projection name -> defused name
    (Mixtral: ``{"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}``).
``dense_key_patterns``
    Model type -> checkpoint key patterns of fused dense weights (kept for old plugins; no
    longer needed).
``model_patches``
    Model type -> function patching a converted model's runtime behaviour in place and
    returning the names of what it patched (called by ``convert_model``; twice is harmless).
``transformers``, ``core``
    Version ranges (PEP 440 specifiers) the plugin supports; outside them it is not loaded.
``priority``
    Higher wins a model type two plugins claim (ties: the smaller name).
``description``
    One line for ``defuser plugins`` and the README table.
``tested_on``
    Transformers releases the plugin was tested on; ``defuser plugins`` flags others.
``model_code``
    Module names the ``defuser`` command imports before it resolves a model type or reads a
    config: the package that registers the family's own config and model classes with
    transformers (``AutoConfig.register``), when transformers does not ship them.
``tiny_models``
    Model type (a claimed one, or a sub-model of one) -> :class:`TinyModel`: what building a
    tiny random model of it needs beyond core's generic shrinking (``defuser demo``, the
    self-check's stand-in model, the testkit).  Fields: ``config`` (attribute -> value set on
    the shrunk config, a dotted name reaching into a sub-config: ``"attn_config.clip_qkv"``),
    ``inputs`` (``"module:function"`` building ``function(model, batch, length, generator) ->
    dict`` of forward inputs for a model token ids cannot drive; imported when first used),
    ``embeds_only`` (fed embeddings, it cannot embed ids itself) and ``multimodal_rope`` (reads
    a default ``mrope_section``, rescaled to the shrunk head).

:class:`TypeSupport` fields
---------------------------
``model_type``
    The ``config.model_type`` claimed (a key of ``transformers.CONFIG_MAPPING``).
``preload``
    True (the default) when ``replace_fused_blocks(model_type)`` patches the type before load;
    ``preload=False`` opts a type out (``replace_fused_blocks`` then returns False).  Plain
    preload needs no hook: :class:`Family` builds the :class:`PreloadPlan` from the
    declarations.  (Core 0.1 changed the default from False: every first-party type patched.)
``notes``
    Free text for the README's supported-model table.
``min_transformers``
    Oldest release the type is tested on; the testkit skips it (saying why) on older ones.
``reload``
    How a checkpoint saved from the defused model loads again: :data:`RELOAD_STOCK` (plain
    transformers loads it; the default), :data:`RELOAD_PATCHED` (only after
    ``replace_fused_blocks``; needs ``preload``) or :data:`RELOAD_NONE`.
``reload_blocker``
    Why it cannot reload; set exactly when ``reload`` is :data:`RELOAD_NONE`.
``preload_min_transformers``
    First release on which pre-load patching works, when older ones cannot.
``stock_reload_from``
    Release from which stock transformers reloads a non-stock ``reload`` type too.
``dense``
    What happens to the type's fused dense gate-up Linears: :data:`DENSE_SPLIT`,
    :data:`DENSE_KEPT`, or ``""`` (it has none).

Layouts
-------
Shapes below use ``E`` experts, hidden size ``H`` and expert intermediate size ``I``.
*Not transposed* means ``nn.Linear`` orientation, ``[out, in]`` per expert; *transposed* is
``[in, out]`` per expert (the forward computes ``x @ w``)::

    ExpertsLayout               gate_up_proj       down_proj
    is_transposed=False         [E, 2I, H]         [E, H, I]
    is_transposed=True          [E, H, 2I]         [E, I, H]
    down_transposed=<bool>      (unchanged)        overrides the down orientation alone
    separate_gate_up=True       gate [E, I, H] and up [E, I, H] in two tensors
    flattened=True              the same with E and the next dim merged: [E*2I, H], [E*H, I]
    has_gate=False              up_proj [E, I, H] alone ("first" tensor), then down_proj

    ParallelLayout              weight
    transposed=False            [E, out, in]
    transposed=True             [E, in, out]

Gate-up halves: ``is_concatenated=True`` puts one half in rows ``[:I]`` and the other in
``[I:]`` (along the ``2I`` dim); ``False`` interleaves them (even rows, odd rows).
``gate_first=False`` says the first half (or the even rows) is the up projection.

:class:`ExpertsLayout` fields (an ``experts_classes`` or ``layout_overrides`` entry names any
of them but ``num_experts``):

``num_experts``
    ``E``, read from the tensors (or the module's ``num_experts`` when ``flattened``).
``has_gate``, ``has_bias``
    A gated (GLU) expert; bias tensors ``<name>_bias`` (``[E, 2I]``, ``[E, H]``) beside the weights.
``is_transposed``, ``down_transposed``
    Orientation, as pictured; ``down_transposed=None`` (default) follows ``is_transposed``.
``is_concatenated``, ``gate_first``
    Order of the gate and up halves, as above.
``separate_gate_up``, ``flattened``
    Gate and up in two tensors; 2D storage with the expert dim merged, as pictured.
``gate_up_name``, ``gate_name``, ``up_name``, ``down_name``
    Tensor names on the module (dotted names reach into children: DBRX's ``"mlp.w1"``).
``has_post_expert_norm``, ``post_expert_norm_by_expert``
    A norm applied to each expert's output; called as ``post_expert_norm(out, expert_ids)``
    (one scale per expert) when the second is set.
``identity_experts``
    Routing indices past the last real expert pass the input through (an int, or a callable).
``contract``
    The fused forward: ``"routed"`` ``(hidden_states, top_k_index, top_k_weights)``,
    ``"expert_major"`` ``(hidden_states[E*T, H])`` with every token through every expert, or
    ``"weighted_all"`` ``(hidden_states, gammas)`` scaling each token per expert.
``activation``
    Attribute path of the activation on the fused module (default ``"act_fn"``).
``gate_style``
    ``"default"``: ``act(gate) * up``; ``"module"``: the fused class's own ``_apply_gate``.

:class:`DenseLayout` fields: ``fused_name`` (the attribute holding the fused ``nn.Linear``
``[2I, H]``, default ``"gate_up_proj"``) and ``gate_first``.  :class:`ParallelLayout` fields:
``weight_name`` (default ``"weight"``), ``transposed`` (as pictured), and ``gated_paths`` (a
regex of the GLU input projections' paths) and ``gate_first``, which only document the layout:
each expert's one ``linear`` keeps the gate and up rows together and the parent splits them.

Raw-hook objects
----------------
:class:`Candidate` (what ``defuser_detect_candidate`` returns): ``path`` (dotted module path),
``module``, ``kind`` (``"experts"``, ``"dense"`` or ``"parallel"``), ``plugin`` (the plugin's
name), ``layout`` (the matching layout object), ``model_type`` (of the closest enclosing
pretrained model), ``generic`` (set by core's generic engine only), ``extra`` (free-form notes
between a plugin's detect and defuse hooks) and ``refusal`` (non-empty: why this fused module
must not be defused; ``convert_model`` then raises before changing anything).

:class:`PreloadPlan` (what ``defuser_preload_plan`` returns): ``model_type``,
``modeling_modules`` (transformers modules whose experts classes are replaced),
``mapping_types`` (model types and class names whose checkpoint mapping changes; default the
model type), ``experts_classes`` (the decorated classes to replace; ``None``: all),
``declared_experts`` and ``layout_overrides`` (class name -> :class:`ExpertsLayout` fields),
``dense_classes`` (class name -> :class:`DenseLayout`), ``parallel_classes`` (class name ->
:class:`ParallelLayout`), ``key_renames`` and ``legacy_projection_names`` (as in
:class:`Family`); ``dense_key_patterns`` and ``experts_key_prefix`` are kept for old plugins.

:class:`PluginInfo` (what ``defuser_plugin_info`` returns; :class:`Family` builds it):
``name``, ``model_types``, ``transformers``, ``core``, ``priority``, ``description``,
``tested_on`` and ``tiny_models`` as in :class:`Family`, and ``distribution`` (filled in by the
loader).

Raw hooks
---------
A plugin that declarations cannot describe implements hooks (see :mod:`defuser.hookspecs` for
the contract of each) with :data:`hookimpl`.  A method overriding a hook on a :class:`Family`
subclass needs its own ``@hookimpl`` decorator: pluggy reads the marker from the function, and
an override without it is not a hook.  A plugin that fails to load, or a hook that raises,
is reported as :class:`PluginError` naming the plugin and the hook (raised where the manager
is strict, a warning otherwise).  ``defuser_detect_candidate`` returns a
:class:`Candidate`; ``defuser_preload_plan`` returns a :class:`PreloadPlan`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import import_module
from typing import TYPE_CHECKING, Any

from defuser.declarations import ExpertsDecl, LayoutOverride
from defuser.engine.candidates import Candidate, DenseLayout, ExpertsLayout, ParallelLayout
from defuser.errors import ConversionError, DeclarationError, DeclarationMismatch, PluginError
from defuser.family import Family
from defuser.hookspecs import hookimpl
from defuser.plugin_info import (
    DENSE_KEPT,
    DENSE_SPLIT,
    DENSE_WAYS,
    RELOAD_NONE,
    RELOAD_PATCHED,
    RELOAD_STOCK,
    RELOAD_WAYS,
    PluginInfo,
    TinyModel,
    TypeSupport,
)

if TYPE_CHECKING:
    from defuser.engine.detect import layer_index
    from defuser.engine.experts import DefusedExperts
    from defuser.engine.preload import PreloadPlan
    from defuser.plugins import DefuserPluginManager
    from defuser.tiny import SHRINK, build_tiny_model, tiny_config, tiny_forward, tiny_inputs

__all__ = [
    "DENSE_KEPT",
    "DENSE_SPLIT",
    "DENSE_WAYS",
    "RELOAD_NONE",
    "RELOAD_PATCHED",
    "RELOAD_STOCK",
    "RELOAD_WAYS",
    "SHRINK",
    "Candidate",
    "ConversionError",
    "DeclarationError",
    "DeclarationMismatch",
    "DefusedExperts",
    "DenseLayout",
    "ExpertsDecl",
    "ExpertsLayout",
    "Family",
    "LayoutOverride",
    "ParallelLayout",
    "PluginError",
    "PluginInfo",
    "PreloadPlan",
    "TinyModel",
    "TypeSupport",
    "build_tiny_model",
    "hookimpl",
    "isolated_plugins",
    "layer_index",
    "tiny_config",
    "tiny_forward",
    "tiny_inputs",
]

# Names that import torch (or transformers): loaded on first access, from where they live.
# PreloadPlan:     what ``defuser_preload_plan`` returns (a frozen dataclass).
# DefusedExperts:  the module a defused experts block becomes (numbered experts, each with
#                  gate_proj/up_proj/down_proj ``nn.Linear``); raw defuse hooks may build one.
# layer_index:     the decoder layer a module path lies in (what ``max_layers`` counts).
# build_tiny_model, tiny_config, tiny_inputs, tiny_forward, SHRINK: seeded tiny models of any
#                  model type, for plugin tests (the testkit re-exports them).
_LAZY = {
    "PreloadPlan": "defuser.engine.preload",
    "DefusedExperts": "defuser.engine.experts",
    "layer_index": "defuser.engine.detect",
    "SHRINK": "defuser.tiny",
    "build_tiny_model": "defuser.tiny",
    "tiny_config": "defuser.tiny",
    "tiny_forward": "defuser.tiny",
    "tiny_inputs": "defuser.tiny",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'defuser.plugin' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


@contextlib.contextmanager
def isolated_plugins(*plugins: object, autoload: bool = False) -> Iterator[DefuserPluginManager]:
    """Within the ``with`` block, defuser sees only ``plugins`` (and core's generic engine).

    A fresh plugin manager, holding each of ``plugins`` (a :class:`Family` is registered under
    its ``name``, any other object under its ``__name__`` or class name), replaces the
    process-wide one for the block: ``convert_model``, ``replace_fused_blocks`` and
    ``defuser plugins`` use it.  With ``autoload=True`` the installed entry-point plugins load
    too.  The manager is yielded (its ``register(plugin, name)`` adds more); the previous one
    is put back on exit.  Meant for tests; not thread-safe against conversions running
    meanwhile in other threads.
    """
    import defuser.plugins as plugin_manager_module

    manager = plugin_manager_module.DefuserPluginManager(autoload=autoload)
    for plugin in plugins:
        info = getattr(plugin, "info", None)
        manager.register(plugin, info.name if isinstance(info, PluginInfo) else None)
    with plugin_manager_module._manager_lock:
        previous = plugin_manager_module._manager
        plugin_manager_module._manager = manager
    try:
        yield manager
    finally:
        with plugin_manager_module._manager_lock:
            plugin_manager_module._manager = previous
