"""The ``defuser`` command: ``demo``, ``inspect``, ``verify``, ``convert``, ``plugins`` and
``new-plugin``."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["main"]

logger = logging.getLogger("defuser")


def _positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more (``convert_model`` rejects 0 layers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _shape(tensor: object) -> str:
    return "x".join(str(d) for d in getattr(tensor, "shape", ()))


def _squeezed(model_type: str) -> str:
    return model_type.lower().replace("_", "").replace("-", "")


def _unknown_model_type(model_type: str) -> str | None:
    """None when transformers knows ``model_type``, else one line naming it and up to three
    close matches (case, ``_`` and ``-`` ignored when comparing)."""
    from transformers import CONFIG_MAPPING

    known = list(CONFIG_MAPPING.keys())
    if model_type in known:
        return None
    by_squeezed: dict[str, list[str]] = {}
    for name in known:
        by_squeezed.setdefault(_squeezed(name), []).append(name)
    squeezed = _squeezed(model_type)
    matches = list(by_squeezed.get(squeezed, []))
    for close in difflib.get_close_matches(squeezed, list(by_squeezed), n=3, cutoff=0.6):
        matches += [name for name in by_squeezed[close] if name not in matches]
    line = f"unknown model type {model_type!r}"
    if matches:
        line += f"; did you mean {', '.join(matches[:3])}?"
    return line


def _demo(args: argparse.Namespace) -> int:
    from torch import nn

    from defuser import convert_model
    from defuser.api import find_candidates
    from defuser.engine.experts import DefusedExperts
    from defuser.engine.parallel import DefusedParallelExperts
    from defuser.report import fused_tensors_of
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
        tensors = fused_tensors_of(c)
        rows.append((c.path, c.class_name, ", ".join(f"{n} {_shape(t)}" for n, t in tensors.items()), c.plugin))
    print(_table(("module", "class", "fused tensors", "plugin"), rows))
    before = tiny_forward(model, inputs)
    assert convert_model(model)
    after = tiny_forward(model, inputs)
    modules = dict(model.named_modules())
    layout: list[tuple[str, str, str]] = []
    for c in candidates:
        module = modules[c.path]
        if isinstance(module, DefusedExperts):
            expert = module[0]
            projections = ", ".join(
                f"{n} {_shape(getattr(expert, n).weight)}"
                for n in ("gate_proj", "up_proj", "down_proj")
                if hasattr(expert, n)
            )
            layout.append(
                (c.path, f"{type(module).__name__}[{len(module)}]", f"{c.path}.0..{len(module) - 1}: {projections}")
            )
        elif isinstance(module, DefusedParallelExperts):
            linears = [
                f"{name or 'linear'} {_shape(layer.weight)}"
                for name, layer in module[0].named_modules()
                if isinstance(layer, nn.Linear)
            ]
            layout.append(
                (
                    c.path,
                    f"{type(module).__name__}[{len(module)}]",
                    f"{c.path}.0..{len(module) - 1}: {', '.join(linears)}",
                )
            )
        else:
            layout.append(
                (
                    c.path,
                    type(module).__name__,
                    f"gate_proj {_shape(module.gate_proj.weight)}, up_proj {_shape(module.up_proj.weight)}",
                )
            )
    print("\nafter: per-expert nn.Linear layout")
    print(_table(("module", "now", "nn.Linear projections"), layout))
    difference = (after - before).abs().max().item()
    print(f"\nmax abs difference of the output before/after: {difference:.3e}")
    return 0 if difference <= 1e-5 else 2


def _layers(indices: list[int]) -> str:
    if not indices:
        return "-"
    ordered = sorted(set(indices))
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])
    return ",".join(map(str, ordered))


def _inspect(args: argparse.Namespace) -> int:
    import json

    from defuser.report import inspect_model, load_config, model_on_meta

    config = load_config(args.source)
    model = model_on_meta(config)
    groups = inspect_model(model, filter=args.filter, max_layers=args.max_layers)
    model_type = getattr(config, "model_type", "?")
    total = sum(group.fused_parameters for group in groups)
    selected = sum(group.fused_parameters * group.selected // max(group.count, 1) for group in groups)
    if args.json:
        report = {
            "model_type": model_type,
            "model_class": type(model).__name__,
            "candidates": [group.as_dict() for group in groups],
            "fused_parameters": total,
            "selected_fused_parameters": selected,
        }
        print(json.dumps(report, indent=2))
        return 0 if groups else 1
    print(f"model: {type(model).__name__} ({model_type}), built on the meta device from the config")
    if not groups:
        print(f"nothing to defuse in {model_type}")
        return 1
    rows = [
        (
            group.pattern,
            _layers(group.layers),
            group.class_name,
            ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in group.fused_tensors.items()),
            group.defused_into,
            group.plugin,
            group.when,
            f"{group.selected}/{group.count}",
        )
        for group in groups
    ]
    headers = ("module", "layers", "class", "fused tensors", "defused into", "plugin", "when", "selected")
    print(_table(headers, rows))
    print(f"\nparameters in fused blocks: {total:,} ({selected:,} selected)")
    return 0


def _load_report_problems(info: dict) -> list[str]:
    """What a ``from_pretrained(..., output_loading_info=True)`` report says went wrong: keys
    missing from the checkpoint (initialised at random), unexpected or mismatched."""
    problems = []
    for label in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(key) for key in info.get(f"{label}_keys") or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    return problems


def _load_for_verify(source: str, config: Any) -> tuple[Any, str]:
    """The model at ``source`` loaded with every weight accounted for, and how it was loaded.

    Stock transformers first (the fused model); a checkpoint it cannot load completely (a
    per-expert one whose family has no stock mapping, as ``defuser convert`` writes for
    gpt_oss) is loaded again into a model built by ``replace_fused_blocks``, as the README's
    reload column says.  Any missing, unexpected or mismatched weight left is an error.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from defuser import defused_blocks

    autos: tuple[Any, ...] = (AutoModelForCausalLM, AutoModel)
    auto = next((a for a in autos if type(config) in getattr(a, "_model_mapping", {})), None)
    if auto is None:
        raise ValueError(f"{source}: no Auto class loads model type {config.model_type!r}")

    def load() -> tuple[Any, list[str]]:
        model, info = auto.from_pretrained(source, local_files_only=True, dtype="auto", output_loading_info=True)
        return model.eval(), _load_report_problems(info)

    model, stock_problems = load()
    if not stock_problems:
        return model, "stock"
    del model
    problems: list[str] = []
    with defused_blocks(config.model_type) as patched:
        if patched:
            model, problems = load()
            if not problems:
                return model, "replace_fused_blocks"
    raise ValueError(
        f"{source}: the checkpoint does not load completely into {config.model_type!r}: "
        + "; ".join(stock_problems)
        + ("" if not patched else f" (and through replace_fused_blocks: {'; '.join(problems)})")
    )


def _verify(args: argparse.Namespace) -> int:
    from defuser import convert_model, fuse_model
    from defuser.report import load_config
    from defuser.tiny import tiny_inputs

    config = load_config(args.source)
    model, loaded_by = _load_for_verify(args.source, config)
    inputs = tiny_inputs(model, batch=args.batch, length=args.length, seed=args.seed)
    if loaded_by == "stock":
        reference = _use_eager_experts(model)
        before = _outputs(model, inputs)
        if not convert_model(model, filter=args.filter, max_layers=args.max_layers):
            raise ValueError(f"{args.source}: nothing to defuse in {config.model_type}")
        after = _outputs(model, inputs)
    else:
        # Built defused: the fused reference is the same weights fused back.
        after = _outputs(model, inputs)
        if not fuse_model(model, filter=args.filter):
            raise ValueError(f"{args.source}: the model built by replace_fused_blocks has nothing to fuse back")
        reference = _use_eager_experts(model)
        before = _outputs(model, inputs)
    print(f"model: {type(model).__name__} ({config.model_type}), inputs {args.batch}x{args.length} (seed {args.seed})")
    if loaded_by != "stock":
        print("loaded through replace_fused_blocks (stock transformers cannot load this checkpoint completely)")
    print(f"reference: the fused model, {reference}")
    computed_in = getattr(model, "dtype", None)
    rows, failed = [], False
    for name, expected in before.items():
        absolute = (after[name].float() - expected.float()).abs()
        relative = (absolute / expected.float().abs().clamp_min(1e-12)).max().item()
        atol = args.atol if args.atol is not None else _default_atol(expected, computed_in)
        ok = absolute.max().item() <= atol  # NaN fails
        failed = failed or not ok
        rows.append((name, f"{absolute.max().item():.3e}", f"{relative:.3e}", f"{atol:.3g}", "ok" if ok else "FAIL"))
    print(_table(("output", "max abs diff", "max rel diff", "atol", "result"), rows))
    return 1 if failed else 0


def _use_eager_experts(model: Any) -> str:
    """Switch ``model``'s fused experts to transformers' eager per-expert loop, the exact
    reference of the defused experts (``grouped_mm`` and ``batched_mm`` run other kernels, which
    round differently in bfloat16); says which experts implementation the reference runs."""
    default = getattr(model.config, "_experts_implementation", None)
    if default in (None, "eager"):
        return "experts as transformers runs them"
    try:
        model.set_experts_implementation("eager")
    except Exception as error:  # a model that cannot switch: compare with what it runs
        return f"experts run by {default!r} (eager unavailable: {error})"
    return f"experts run by transformers' eager loop (its default here: {default!r})"


_FLOAT32_ATOL = 1e-5


def _default_atol(reference: Any, computed_in: Any) -> float:
    """1e-5 for a model computing in float32 or wider; for narrower ones (bfloat16, float16),
    whose last bits depend on the kernel, the self-check's tolerance for the dtype times the
    largest reference magnitude (never below 1e-5), whatever dtype the output is cast to."""
    import torch

    from defuser.engine.selfcheck import relative_tolerance

    dtype = computed_in if isinstance(computed_in, torch.dtype) else reference.dtype
    if dtype in (torch.float32, torch.float64):
        return _FLOAT32_ATOL
    scale = reference.detach().float().abs().max().item() if reference.numel() else 0.0
    return max(_FLOAT32_ATOL, relative_tolerance(dtype) * scale)


def _outputs(model: Any, inputs: dict) -> dict:
    """Every floating-point tensor the model returns, by output name (no cache, seeded)."""
    import torch

    from defuser.tiny import tiny_forward

    outputs = {}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            result = model(**inputs, use_cache=False)
        except Exception:  # a model whose forward needs more than token ids: its main output
            result = {}
    for name, value in result.items() if hasattr(result, "items") else enumerate(result):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            outputs[str(name)] = value
    return outputs or {"main output": tiny_forward(model, inputs)}


def _plugins_json() -> dict[str, Any]:
    """What ``defuser plugins --json`` prints: the installed releases, each plugin (ranges,
    tested releases, model types, hooks implemented, load error) and the contested types."""
    import dataclasses

    from defuser import __version__
    from defuser.compat import transformers_version
    from defuser.engine.generic import GENERIC_PLUGIN_NAME
    from defuser.fit import untested_here
    from defuser.plugins import get_plugin_manager, list_plugins

    found = transformers_version()
    listed = []
    claimants: dict[str, list[str]] = {}
    for plugin in list_plugins():
        info = plugin.info
        for support in info.model_types if info else ():
            claimants.setdefault(support.model_type, []).append(plugin.name)
        untested = untested_here(info) if plugin.name != GENERIC_PLUGIN_NAME and not plugin.error else None
        listed.append(
            {
                "name": plugin.name,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "status": "error" if plugin.error else "ok",
                "error": plugin.error,
                "transformers": info.transformers if info else None,
                "core": info.core if info else None,
                "tested_on": list(info.tested_on) if info else [],
                "untested_on": None if untested is None else str(untested),
                "priority": info.priority if info else None,
                "description": info.description if info else "",
                "model_types": [dataclasses.asdict(support) for support in info.model_types] if info else [],
                "hooks": list(plugin.hooks),
            }
        )
    manager = get_plugin_manager()
    return {
        "transformers": None if found is None else str(found),
        "defuser_core": __version__,
        "plugins": listed,
        "conflicts": {
            model_type: {"claimants": names, "winner": manager.owner_of(model_type)}
            for model_type, names in sorted(claimants.items())
            if len(names) > 1
        },
    }


def _plugins(args: argparse.Namespace) -> int:
    from defuser.engine.generic import GENERIC_PLUGIN_NAME
    from defuser.fit import absent_declarations, claimed_here, generic_takeovers, untested_here
    from defuser.plugins import list_plugins

    if args.json:
        import json

        print(json.dumps(_plugins_json(), indent=2))
        return 0
    rows = []
    untested = []
    for plugin in list_plugins():
        info = plugin.info
        types = ", ".join(t.model_type for t in info.model_types) if info else "-"
        release = untested_here(info) if plugin.name != GENERIC_PLUGIN_NAME and not plugin.error else None
        if release is not None:
            untested.append(plugin)
        rows.append(
            (
                plugin.name,
                plugin.distribution or "-",
                plugin.version or "-",
                info.transformers if info else "-",
                ", ".join(info.tested_on) if info and info.tested_on else "-",
                types or "(decorated experts, dense gate_up_proj)",
                plugin.error or ("ok" if release is None else f"ok, untested on {release}"),
            )
        )
    print(_table(("plugin", "distribution", "version", "transformers", "tested on", "model types", "status"), rows))
    print("\nhooks implemented:")
    for plugin in list_plugins():
        hooks = ", ".join(hook.removeprefix("defuser_") for hook in plugin.hooks) or "(none: not loaded)"
        print(f"  {plugin.name}: {hooks}")
    for plugin in untested:
        print(f"\n{plugin.name}: untested on transformers {untested_here(plugin.info)}; handled generically there:")
        if not claimed_here(plugin.info):
            print("  (nothing: none of its model types exists in this transformers)")
            continue
        takeovers = generic_takeovers(plugin.obj)
        for model_type, why in sorted(takeovers.items()):
            print(f"  {model_type}: {why}")
        if not takeovers:
            print("  (none: every type it claims here uses its declarations, self-checked)")
        absent = absent_declarations(plugin.obj)
        if absent:
            print(f"  declared, but not in this transformers: {', '.join(absent)}")
    claimants: dict[str, list[str]] = {}
    for plugin in list_plugins():
        for support in plugin.info.model_types if plugin.info else ():
            claimants.setdefault(support.model_type, []).append(plugin.name)
    conflicts = {model_type: names for model_type, names in claimants.items() if len(names) > 1}
    if conflicts:
        from defuser.plugins import get_plugin_manager

        manager = get_plugin_manager()
        print("\nconflicts (the winner handles the type):")
        for model_type, names in sorted(conflicts.items()):
            print(f"  {model_type}: {', '.join(names)} -> {manager.owner_of(model_type)}")
    return 0


def _plugin_name(text: str) -> str:
    """argparse type: a valid plugin name (see :func:`defuser.scaffold.check_plugin_name`)."""
    from defuser.scaffold import check_plugin_name

    try:
        return check_plugin_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _new_plugin(args: argparse.Namespace) -> int:
    from defuser.scaffold import new_plugin

    folder = new_plugin(args.name, args.model_type or (), args.dest)
    print(
        f"wrote {folder}: pip install -e {folder} (with defuser-core and defuser-testkit from the"
        " defuser checkout, see docs/writing-a-plugin.md), then run pytest there"
    )
    return 0


def _part(text: str) -> Any:
    """argparse type of ``--shards``: ``I/N``, part I of N."""
    from defuser.offline.parts import parse_part

    try:
        return parse_part(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _default_jobs() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _mebibytes(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f}"


def _convert(args: argparse.Namespace) -> int:
    from defuser.offline import carry_out, format_plan, merge_parts, part_folder, plan_conversion

    plan = plan_conversion(args.source, args.destination, reverse=args.reverse, overwrite=args.overwrite)
    print(format_plan(plan), flush=True)
    if args.shards is not None:
        from defuser.offline.parts import part_shards

        names = [plan.shards[index].name for index in part_shards(plan, args.shards)]
        print(f"part {args.shards}: {len(names)} shard(s) into {part_folder(plan.destination, args.shards)}")
    if args.merge:
        from defuser.offline.parts import find_parts

        parts = find_parts(plan)  # checked in a dry run too
        print(f"merge: parts 1 to {len(parts)} of {len(parts)} found, made from this plan")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if args.merge:
        report = merge_parts(plan)
        print(f"wrote {report.folder} in {report.seconds:.1f} s from {args.destination}.part-*")
        return 0
    jobs = args.jobs if args.jobs is not None else _default_jobs()
    report = carry_out(plan, jobs=jobs, part=args.shards)
    memory = ", ".join(f"{_mebibytes(peak)} (+{_mebibytes(peak - start)})" for _, start, peak in report.job_memory)
    print(f"wrote {report.folder} in {report.seconds:.1f} s")
    print(f"jobs: {report.jobs}, {report.seconds:.3f} s; peak RSS per job, MiB (+ added during the job): {memory}")
    return 0


def _model_types_of(args: argparse.Namespace) -> list[str]:
    """The model types named on the command line (checked against transformers before running)."""
    value = getattr(args, "model_type", None)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``defuser`` command."""
    parser = argparse.ArgumentParser(
        prog="defuser", description="Defuse fused MoE experts and MLPs of transformers models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or warnings, errors only")
    # The same switches after the subcommand; SUPPRESS keeps a subcommand's absent switch from
    # overwriting one given before it.
    switches = argparse.ArgumentParser(add_help=False)
    switches.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    switches.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", parents=[switches], help="defuse a built-in tiny model and show before/after")
    demo.add_argument("--model-type", default="qwen3_moe", help="any supported model type (default: qwen3_moe)")
    demo.set_defaults(run=_demo)
    inspect = commands.add_parser(
        "inspect", parents=[switches], help="show what defusion would do, from the config alone"
    )
    inspect.add_argument("source", help="a local model folder, a config.json, or a hub id already in the cache")
    inspect.add_argument(
        "--filter", action="append", metavar="RULE", help="PCRE rule (+:re, -:re, re), repeatable; write --filter=-:re"
    )
    inspect.add_argument("--max-layers", type=_positive_int, help="preview converting decoder layers 0..N-1 only")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=_inspect)
    verify = commands.add_parser("verify", parents=[switches], help="defuse a local model and compare its outputs")
    verify.add_argument("source", help="a local model folder (weights are loaded)")
    verify.add_argument(
        "--atol",
        type=float,
        default=None,
        help="largest allowed absolute difference (default: 1e-5 for a float32 model; for bfloat16 and "
        "float16 the self-check's tolerance for the dtype times the largest output magnitude)",
    )
    verify.add_argument("--filter", action="append", metavar="RULE", help="PCRE rule; repeatable")
    verify.add_argument("--max-layers", type=_positive_int, help="convert decoder layers 0..N-1 only")
    verify.add_argument("--batch", type=_positive_int, default=2)
    verify.add_argument("--length", type=_positive_int, default=16)
    verify.add_argument("--seed", type=int, default=1)
    verify.set_defaults(run=_verify)
    convert = commands.add_parser(
        "convert", parents=[switches], help="rewrite a safetensors checkpoint fused -> per-expert, offline"
    )
    convert.add_argument("source", help="a local model folder with config.json and safetensors weights")
    convert.add_argument("destination", help="a new folder for the result (written beside it, then renamed)")
    convert.add_argument("--reverse", action="store_true", help="per-expert -> fused instead")
    convert.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="output shards written at a time, each in its own process (default: the CPUs available)",
    )
    several = convert.add_mutually_exclusive_group()
    several.add_argument(
        "--shards",
        type=_part,
        metavar="I/N",
        help="write only part I of N of the output shards, into DST.part-I-of-N (one per machine; then --merge)",
    )
    several.add_argument(
        "--merge", action="store_true", help="make DST from the N part folders DST.part-I-of-N that --shards wrote"
    )
    convert.set_defaults(run=_convert)
    plugins = commands.add_parser("plugins", parents=[switches], help="list installed plugins")
    plugins.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    plugins.set_defaults(run=_plugins)
    scaffold = commands.add_parser(
        "new-plugin", parents=[switches], help="write a third-party plugin distribution to start from"
    )
    scaffold.add_argument("name", type=_plugin_name, help="entry-point name; the package is defuser_NAME")
    scaffold.add_argument(
        "--model-type", action="append", metavar="T", help="a model type the plugin claims; repeatable"
    )
    scaffold.add_argument("--dest", help="a new folder for it (default: ./defuser-NAME)")
    scaffold.set_defaults(run=_new_plugin)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    with _quieted(args.quiet):
        return _run(args)


@contextlib.contextmanager
def _quieted(quiet: bool) -> Iterator[None]:
    """With ``quiet``: no progress bars, no Python warnings and transformers' log at errors
    only, until the command returns (``main`` also runs in-process: all is put back)."""
    if not quiet:
        yield
        return
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    # Set before transformers imports tqdm, which reads it once then for every bar.
    os.environ["TQDM_DISABLE"] = "1"
    transformers_logging: Any
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # `defuser plugins` runs without transformers
        transformers_logging = None
    verbosity = transformers_logging.get_verbosity() if transformers_logging else None
    bars = transformers_logging.is_progress_bar_enabled() if transformers_logging else False
    if transformers_logging:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if transformers_logging and verbosity is not None:
            transformers_logging.set_verbosity(verbosity)
            if bars:
                transformers_logging.enable_progress_bar()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable


def _run(args: argparse.Namespace) -> int:
    from defuser.compat import MIN_TRANSFORMERS, supported_transformers_installed, transformers_version

    if args.command != "plugins" and not supported_transformers_installed():
        found = transformers_version() or "none"
        print(f"defuser {args.command}: error: needs transformers>={MIN_TRANSFORMERS}, found {found}", file=sys.stderr)
        return 1
    if args.command not in ("plugins", "new-plugin"):
        from defuser.plugins import get_plugin_manager

        try:  # a family whose model classes its own package registers: import it first
            get_plugin_manager().register_models()
        except Exception as error:
            if args.debug:
                raise
            print(f"defuser {args.command}: error: {error}", file=sys.stderr)
            return 1
    for model_type in _model_types_of(args):
        unknown = _unknown_model_type(model_type)
        if unknown:
            if args.command == "new-plugin":  # a type the author's own package registers
                unknown += (
                    "; for a type your own package registers, leave --model-type out and add it to"
                    " hooks.py with model_code"
                )
            print(f"defuser {args.command}: error: {unknown}", file=sys.stderr)
            return 2  # a usage error, as argparse's own
    try:
        return args.run(args)
    except Exception as error:
        if args.debug:
            raise
        print(f"defuser {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
