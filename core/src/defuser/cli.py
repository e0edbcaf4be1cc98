"""The ``defuser`` command: ``demo`` and ``plugins``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

logger = logging.getLogger("defuser")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _shape(tensor: object) -> str:
    return "x".join(str(d) for d in getattr(tensor, "shape", ()))


def _demo(args: argparse.Namespace) -> int:
    from torch import nn

    from defuser import convert_model
    from defuser.api import find_candidates
    from defuser.engine.experts import DefusedExperts
    from defuser.engine.parallel import DefusedParallelExperts
    from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

    model = build_tiny_model(args.model_type)
    inputs = tiny_inputs(model)
    candidates = find_candidates(model)
    print(
        f"model: {type(model).__name__} ({args.model_type}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, random weights"
    )
    if not candidates:
        print(f"nothing to defuse in {args.model_type}")
        return 1
    print("\nbefore: fused modules")
    rows = []
    for c in candidates:
        tensors = (
            {f"{c.layout.fused_name}.weight": getattr(c.module, c.layout.fused_name).weight}
            if c.kind == "dense"
            else dict(c.module.named_parameters())
        )
        rows.append((c.path, c.class_name, ", ".join(f"{n} {_shape(t)}" for n, t in tensors.items()), c.plugin))
    print(_table(("module", "class", "fused tensors", "plugin"), rows))
    before = tiny_forward(model, inputs)
    assert convert_model(model)
    after = tiny_forward(model, inputs)
    modules = dict(model.named_modules())
    rows = []
    for c in candidates:
        module = modules[c.path]
        if isinstance(module, DefusedExperts):
            expert = module[0]
            projections = ", ".join(
                f"{n} {_shape(getattr(expert, n).weight)}"
                for n in ("gate_proj", "up_proj", "down_proj")
                if hasattr(expert, n)
            )
            rows.append(
                (c.path, f"{type(module).__name__}[{len(module)}]", f"{c.path}.0..{len(module) - 1}: {projections}")
            )
        elif isinstance(module, DefusedParallelExperts):
            linears = [
                f"{name or 'linear'} {_shape(layer.weight)}"
                for name, layer in module[0].named_modules()
                if isinstance(layer, nn.Linear)
            ]
            rows.append((c.path, f"{type(module).__name__}[{len(module)}]", f"{c.path}.0..: {', '.join(linears)}"))
        else:
            rows.append(
                (
                    c.path,
                    type(module).__name__,
                    f"gate_proj {_shape(module.gate_proj.weight)}, up_proj {_shape(module.up_proj.weight)}",
                )
            )
    print("\nafter: per-expert nn.Linear layout")
    print(_table(("module", "now", "nn.Linear projections"), rows))
    difference = (after - before).abs().max().item()
    print(f"\nmax abs difference of the output before/after: {difference:.3e}")
    return 0 if difference <= 1e-5 else 2


def _plugins(args: argparse.Namespace) -> int:
    from defuser.plugins import list_plugins

    rows = []
    for plugin in list_plugins():
        info = plugin.info
        types = ", ".join(t.model_type for t in info.model_types) if info else "-"
        rows.append(
            (
                plugin.name,
                plugin.distribution or "-",
                plugin.version or "-",
                info.transformers if info else "-",
                types or "(decorated experts, dense gate_up_proj)",
                plugin.error or "ok",
            )
        )
    print(_table(("plugin", "distribution", "version", "transformers", "model types", "status"), rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``defuser`` command."""
    parser = argparse.ArgumentParser(
        prog="defuser", description="Defuse fused MoE experts and MLPs of transformers models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="defuse a built-in tiny model and show before/after")
    demo.add_argument("--model-type", default="qwen3_moe", help="any supported model type (default: qwen3_moe)")
    demo.set_defaults(run=_demo)
    plugins = commands.add_parser("plugins", help="list installed plugins")
    plugins.set_defaults(run=_plugins)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        print(f"defuser {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
