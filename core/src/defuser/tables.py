"""The README's supported-model table, generated from the installed plugins' data."""

from __future__ import annotations

from defuser.plugins import list_plugins

__all__ = ["supported_models_markdown"]


def supported_models_markdown() -> str:
    """A markdown table: model type, plugin, before-load patching, after-load conversion, notes."""
    rows = [
        "| model type | plugin | before load (`replace_fused_blocks`) | after load (`convert_model`) | notes |",
        "|---|---|---|---|---|",
    ]
    entries = []
    for plugin in list_plugins():
        if plugin.info is None:
            continue
        for support in plugin.info.model_types:
            entries.append((support.model_type, plugin.name, support))
    for model_type, plugin, support in sorted(entries):
        rows.append(f"| `{model_type}` | {plugin} | {'yes' if support.preload else '-'} | yes | {support.notes} |")
    rows.append(
        "| any other type with `@use_experts_implementation` experts | generic | - | yes | "
        "layout read from the decorator's flags |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(supported_models_markdown())
