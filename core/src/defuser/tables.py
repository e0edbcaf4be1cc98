"""The README's supported-model table, generated from the installed plugins' data."""

from __future__ import annotations

from defuser.plugin_info import DENSE_KEPT, DENSE_SPLIT, RELOAD_NONE, RELOAD_STOCK, TypeSupport
from defuser.plugins import list_plugins

__all__ = ["dense_cell", "reload_cell", "supported_models_markdown"]


def reload_cell(support: TypeSupport) -> str:
    """How a checkpoint saved from a defused ``support.model_type`` model loads again, in words."""
    if support.reload == RELOAD_NONE:
        return f"no: {support.reload_blocker}"
    way = "stock transformers" if support.reload == RELOAD_STOCK else "`replace_fused_blocks`"
    if support.preload_min_transformers and support.reload != RELOAD_STOCK:
        way += f" ({support.preload_min_transformers}+)"
    if support.stock_reload_from:
        way += f"; stock transformers too from {support.stock_reload_from}"
    return way


def dense_cell(support: TypeSupport) -> str:
    """What happens to the type's dense MLPs with one fused gate-up ``nn.Linear``, in words."""
    if support.dense == DENSE_SPLIT:
        return "split: `gate_proj` + `up_proj`"
    if support.dense == DENSE_KEPT:
        return "kept: one `nn.Linear`"
    return ""


def _preload_cell(support: TypeSupport) -> str:
    if not support.preload:
        return "-"
    return f"yes ({support.preload_min_transformers}+)" if support.preload_min_transformers else "yes"


def supported_models_markdown() -> str:
    """A markdown table: model type, plugin, before-load patching, after-load conversion, how a
    saved defused model reloads, what happens to fused dense gate-up Linears, the transformers versions
    it is tested on, and the special handling."""
    from defuser.compat import MIN_TRANSFORMERS

    rows = [
        "| model type | plugin | before load (`replace_fused_blocks`) | after load (`convert_model`) "
        "| reload of a saved defused model | fused dense gate-up Linear | tested on transformers | special handling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    from defuser.engine.generic import GENERIC_PLUGIN_NAME, TESTED_TYPES

    entries = [(support.model_type, GENERIC_PLUGIN_NAME, support) for support in TESTED_TYPES]
    for loaded in list_plugins():
        if loaded.info is None:
            continue
        for support in loaded.info.model_types:
            entries.append((support.model_type, loaded.name, support))
    for model_type, plugin, support in sorted(entries, key=lambda entry: entry[:2]):
        tested = f"{support.min_transformers}+" if support.min_transformers else f"{MIN_TRANSFORMERS}+"
        rows.append(
            f"| `{model_type}` | {plugin} | {_preload_cell(support)} | yes | {reload_cell(support)} "
            f"| {dense_cell(support)} | {tested} | {support.notes} |"
        )
    rows.append(
        "| any other type with `@use_experts_implementation` experts "
        "| generic | yes | yes | - | kept: one `nn.Linear` | - | layout read from the decorator's flags; "
        "a subclass overriding `forward` is refused |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(supported_models_markdown())
