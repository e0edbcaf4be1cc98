"""The README's supported-model table, generated from the installed plugins' data."""

from __future__ import annotations

from defuser.plugins import list_plugins

__all__ = ["supported_models_markdown"]


def supported_models_markdown() -> str:
    """A markdown table: model type, plugin, before-load patching, after-load conversion,
    the transformers versions it is tested on, and the special handling."""
    from defuser.compat import MIN_TRANSFORMERS

    rows = [
        "| model type | plugin | before load (`replace_fused_blocks`) | after load (`convert_model`) "
        "| tested on transformers | special handling |",
        "|---|---|---|---|---|---|",
    ]
    entries = []
    for plugin in list_plugins():
        if plugin.info is None:
            continue
        for support in plugin.info.model_types:
            entries.append((support.model_type, plugin.name, support))
    for model_type, plugin, support in sorted(entries):
        tested = f"{support.min_transformers}+" if support.min_transformers else f"{MIN_TRANSFORMERS}+"
        preload = "yes" if support.preload else "-"
        rows.append(f"| `{model_type}` | {plugin} | {preload} | yes | {tested} | {support.notes} |")
    rows.append(
        "| any other type with `@use_experts_implementation` experts or a dense `gate_up_proj` Linear "
        "| generic | - | yes | - | layout read from the decorator's flags |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(supported_models_markdown())
