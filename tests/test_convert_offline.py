"""`defuser convert`: offline fused <-> per-expert conversion of safetensors checkpoints.

A tiny model per layout family is written in the fused layout and converted offline.  The
result must hold ``convert_model(model)``'s tensors, the per-expert ones under the names
transformers' reversal of the model's weight conversions gives them (Mixtral's stock
``block_sparse_moe.experts.N.w1``; defuser's own ``gate_proj``/``up_proj``/``down_proj`` where
transformers has no per-expert names).  Each result is then loaded with ``from_pretrained``
and run against the fused original, and converted back, byte for byte.

How a per-expert result loads depends on the stock checkpoint mapping (``save_pretrained``
after ``convert_model`` writes the stock fused layout instead, which loads stock everywhere):
- where it merges per-expert keys into every fused tensor (qwen3_moe, mixtral; longcat_flash
  from 5.25.0, whose identity experts before it hold rows the result leaves out): plain
  transformers, in a subprocess that never imports defuser (checked);
- elsewhere (gpt_oss, phi3, llama4_text, qwen3_vl_moe, longcat_flash, jetmoe):
  ``defuser.replace_fused_blocks(model_type)``, then ``from_pretrained``, in the same subprocess
  after the stock loads (one subprocess for every load).

``--reverse`` takes per-expert tensors under either naming (saved names, or the converted
model's state-dict names that older results and ``convert_model(...).state_dict()`` hold).
LongCat-Flash's fused gate-up tensors hold rows for identity ("zero") experts past the routed
ones: the split leaves them out, as ``convert_model`` does, and ``--reverse`` writes zeros
there, as ``fuse_model`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.core_model_loading import revert_weight_conversion

from defuser import convert_model
from defuser.api import find_candidates
from defuser.engine.save import is_fused_on_save
from defuser.offline import OfflineConversionError, convert_checkpoint, execute_plan, plan_conversion
from defuser.offline.safetensors_io import ShardWriter
from defuser.plugin_info import RELOAD_PATCHED, RELOAD_STOCK
from defuser.report import fused_tensors_of
from defuser.tiny import build_tiny_model, tiny_forward, tiny_inputs

# model type -> (model class or None for the tiny default, how the fused checkpoint is written,
# dtype, config overrides)
CASES = {
    "qwen3_moe": (None, "state_dict", torch.bfloat16, {}),
    "mixtral": (None, "state_dict", torch.float32, {}),
    "gpt_oss": (None, "save_pretrained", torch.float32, {}),
    "phi3": (None, "save_pretrained", torch.float32, {}),
    "llama4_text": (None, "save_pretrained", torch.float32, {}),
    # Not square (2I != H), so the stored transpose is visible in the shapes, as in real checkpoints.
    "qwen3_vl_moe": (
        "Qwen3VLMoeForConditionalGeneration",
        "hub",
        torch.float32,
        {"text_config.moe_intermediate_size": 24},
    ),
    # Fused gate-up with identity-expert rows (zeros here, as fuse_model leaves them).
    "longcat_flash": (None, "state_dict", torch.float32, {}),
    # Parallel experts: stacked [E, out, in], gated (GLU) in the MLP, plain in the attention.
    "jetmoe": (None, "state_dict", torch.float32, {}),
}


def _reload_way(model_type: str) -> str:
    """How the per-expert result of ``model_type`` loads: stock where transformers' stock
    checkpoint mapping merges per-expert keys into every fused tensor of the model (Mixtral,
    Qwen3-MoE), else into a model built after ``replace_fused_blocks`` (a per-expert checkpoint
    of a type stock stores fused)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from defuser.api import find_candidates
    from defuser.engine.candidates import DenseLayout, ExpertsLayout
    from defuser.engine.fuse import fused_names
    from defuser.engine.save import stock_merged_names

    model = build_tiny_model(model_type, dtype=CASES[model_type][2], **CASES[model_type][3])
    merged, merged_dense = stock_merged_names(get_model_conversion_mapping(model, add_legacy=False))
    for candidate in find_candidates(model):
        layout = candidate.layout
        if isinstance(layout, ExpertsLayout):
            if not {name for name in fused_names(layout) if not name.endswith("_bias")} <= merged:
                return RELOAD_PATCHED
            tensors = fused_tensors_of(candidate).values()
            if layout.identity_experts and any(tensor.shape[0] > layout.num_experts for tensor in tensors):
                # The result leaves out identity experts' rows, which the stock fused tensor holds.
                return RELOAD_PATCHED
        elif not (isinstance(layout, DenseLayout) and layout.fused_name in merged_dense):
            return RELOAD_PATCHED
    return RELOAD_STOCK


RELOAD = {model_type: _reload_way(model_type) for model_type in CASES}

# Loads checkpoints with from_pretrained; stock jobs run first and record that defuser was not
# imported while they ran; the others patch their type with replace_fused_blocks first.
LOADER = """
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file

jobs = json.loads(open(sys.argv[1]).read())
for job in sorted(jobs, key=lambda job: job["patch"]):
    if job["patch"]:
        import defuser
        assert defuser.replace_fused_blocks(job["model_type"])
    cls = getattr(transformers, job["class"])
    model, info = cls.from_pretrained(job["folder"], dtype=getattr(torch, job["dtype"]), output_loading_info=True)
    job["problems"] = {name: sorted(map(str, keys)) for name, keys in info.items() if keys}
    with torch.no_grad():
        logits = model.eval()(**load_file(job["inputs"]), use_cache=False).logits
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}  # tied: apart
    save_file({"logits": logits.contiguous()}, job["output"])
    save_file(state, job["output"] + ".state")
    job["defuser_imported"] = "defuser" in sys.modules
print(json.dumps(jobs))
"""


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors itself."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(folder / shard))
    return tensors


def _assert_same_bytes(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(_raw(actual[name]), _raw(tensor)), name


def _write_fused(model: torch.nn.Module, folder: Path, writer: str) -> None:
    """A fused checkpoint plus non-weight files.  ``save_pretrained`` keeps the fused keys of
    families transformers loads fused; for families it saves per expert (qwen2-style, mixtral)
    the fused layout is the model's own state dict (``state_dict``); ``hub`` also stores the
    stacked expert weights transposed, as Qwen3-VL-MoE's published checkpoints do."""
    folder.mkdir(parents=True)
    if writer == "save_pretrained":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        tensors = {}
        for name, tensor in model.state_dict().items():
            if writer == "hub" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensor = tensor.transpose(-1, -2)
            tensors[name] = tensor.detach().clone().contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "generation_config.json").write_text('{"do_sample": false}')


def _identity_rows(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fused experts tensors' rows past the routed experts (identity experts), by key; views."""
    rows = {}
    for candidate in find_candidates(model):
        if candidate.kind != "experts" or not candidate.layout.identity_experts:
            continue
        routed = candidate.layout.num_experts
        for name, tensor in fused_tensors_of(candidate).items():
            if tensor.shape[0] > routed:
                rows[f"{candidate.path}.{name}"] = tensor.data[routed:]
    return rows


def _build(model_type: str, zero_identity_rows: bool = True) -> torch.nn.Module:
    """The tiny model of a case (seeded: the same weights every time); identity-expert rows
    zeroed unless asked otherwise, as ``fuse_model`` leaves them."""
    model_class_name, _, dtype, overrides = CASES[model_type]
    model_class = None
    if model_class_name is not None:
        import transformers

        model_class = getattr(transformers, model_class_name)
    model = build_tiny_model(model_type, model_class=model_class, dtype=dtype, **overrides)
    if zero_identity_rows:
        for rows in _identity_rows(model).values():
            rows.zero_()
    return model


def _saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``convert_model(model).state_dict()`` with each per-expert tensor under its per-expert
    checkpoint name (transformers' reversal of the model's weight conversions without the one
    that writes defused modules fused), the other tensors under their own names (the fused
    source keeps them so)."""
    fused_keys = set(model.state_dict())
    assert convert_model(model)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}  # distinct objects
    by_identity = {id(tensor): name for name, tensor in state.items()}
    model._weight_conversions = [entry for entry in model._weight_conversions if not is_fused_on_save(entry)]
    reverted = revert_weight_conversion(model, dict(state))
    saved = {by_identity[id(tensor)]: key for key, tensor in reverted.items() if id(tensor) in by_identity}
    per_expert = [name for name in state if name not in fused_keys]
    assert per_expert and all(name in saved for name in per_expert)
    return {saved[name] if name in per_expert else name: tensor for name, tensor in state.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every family converted both ways, plus the loads that run in one subprocess."""
    root = tmp_path_factory.mktemp("offline")
    cases = {}
    jobs = []
    for model_type, (_, writer, dtype, _) in CASES.items():
        model = _build(model_type)
        inputs = tiny_inputs(model)
        source, result, back = root / model_type / "fused", root / model_type / "per_expert", root / model_type / "back"
        _write_fused(model, source, writer)
        convert_checkpoint(source, result, progress=False)
        convert_checkpoint(result, back, reverse=True, progress=False)
        save_file({k: v.contiguous() for k, v in inputs.items()}, root / model_type / "inputs.safetensors")
        cases[model_type] = {
            "model": model,
            "inputs": inputs,
            "reference": tiny_forward(model, inputs),
            "source": source,
            "result": result,
            "back": back,
        }
        job = {
            "model_type": model_type,
            "class": type(model).__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "inputs": str(root / model_type / "inputs.safetensors"),
            "patch": RELOAD[model_type] == RELOAD_PATCHED,
        }
        jobs.append({**job, "folder": str(result), "output": str(root / model_type / "result.safetensors")})
    # The fused result of --reverse loads stock too, and so does mixtral's stock checkpoint,
    # whose legacy per-expert keys offline conversion copies unchanged.
    qwen3_moe = next(job for job in jobs if job["model_type"] == "qwen3_moe")
    back_output = str(root / "qwen3_moe" / "back.safetensors")
    jobs.append({**qwen3_moe, "folder": str(cases["qwen3_moe"]["back"]), "output": back_output})
    legacy_source, legacy_result = root / "mixtral_legacy" / "fused", root / "mixtral_legacy" / "per_expert"
    cases["mixtral"]["model"].save_pretrained(legacy_source)
    convert_checkpoint(legacy_source, legacy_result, progress=False)
    cases["mixtral_legacy"] = {"source": legacy_source, "result": legacy_result}
    mixtral = next(job for job in jobs if job["model_type"] == "mixtral")
    legacy_output = str(root / "mixtral_legacy.safetensors")
    jobs.append({**mixtral, "patch": False, "folder": str(legacy_result), "output": legacy_output})
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "loader.py").write_text(LOADER)
    done = subprocess.run(
        [sys.executable, str(root / "loader.py"), str(root / "jobs.json")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = {job["folder"]: job for job in json.loads(done.stdout.strip().splitlines()[-1])}
    return {"root": root, "cases": cases, "loaded": loaded}


def _loaded(world: dict, folder: Path, plain: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and state dict of a checkpoint loaded in the subprocess, with no missing or
    unexpected keys; ``plain``: loaded with nothing but transformers (defuser not imported)."""
    job = world["loaded"][str(folder)]
    assert job["problems"] == {}
    assert job["defuser_imported"] is not plain
    return load_file(job["output"])["logits"], load_file(job["output"] + ".state")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # bf16 outputs of equal weights still differ in the last bits when transformers picks
    # another experts kernel after from_pretrained; the weights themselves are compared exactly.
    tolerance = {"rtol": 1.6e-2, "atol": 8e-3} if expected.dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance)


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", list(CASES))
def test_result_holds_the_converted_tensors_under_per_expert_names(world, model_type):
    """The result holds convert_model's tensors under their per-expert checkpoint names (source
    names for the tensors copied unchanged)."""
    case = world["cases"][model_type]
    _assert_same_bytes(_checkpoint(case["result"]), _saved_state_dict(_build(model_type)))


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", list(CASES))
def test_result_loads_with_from_pretrained_and_equal_outputs(world, model_type):
    """Loaded as the stock mapping allows: stock into the fused model (defuser never
    imported), or after replace_fused_blocks into the defused one."""
    case = world["cases"][model_type]
    stock = RELOAD[model_type] == RELOAD_STOCK
    logits, state = _loaded(world, case["result"], plain=stock)
    expected = _build(model_type)
    if not stock:  # built defused by replace_fused_blocks
        assert convert_model(expected)
    _assert_same_bytes(state, expected.state_dict())
    _close(logits, case["reference"])


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", list(CASES))
def test_reverse_round_trip_is_byte_identical(world, model_type):
    case = world["cases"][model_type]
    back = _checkpoint(case["back"])
    if CASES[model_type][1] == "hub":
        # The source stored the stacked experts transposed; --reverse writes them the way the
        # model holds them (what save_pretrained writes), every other tensor as it was.
        _assert_same_bytes(back, case["model"].state_dict())
    else:
        _assert_same_bytes(back, _checkpoint(case["source"]))
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (case["back"] / name).read_bytes() == (case["source"] / name).read_bytes()


@pytest.mark.subprocess
def test_fused_result_of_reverse_loads_stock(world):
    case = world["cases"]["qwen3_moe"]
    logits, state = _loaded(world, case["back"], plain=True)
    _assert_same_bytes(state, case["model"].state_dict())
    _close(logits, case["reference"])


def _expert_keys(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in tensors if ".experts." in key}


@pytest.mark.subprocess
def test_stock_per_expert_checkpoint_is_copied_unchanged(world):
    """save_pretrained writes mixtral in its legacy per-expert names, the names offline
    conversion gives its fused tensors: nothing is fused, the tensors are copied as they are
    and still load stock."""
    legacy = world["cases"]["mixtral_legacy"]
    source = _checkpoint(legacy["source"])
    assert any(".block_sparse_moe.experts.0.w1." in key for key in source)
    assert _expert_keys(_checkpoint(world["cases"]["mixtral"]["result"])) == _expert_keys(source)
    _assert_same_bytes(_checkpoint(legacy["result"]), source)
    logits, state = _loaded(world, legacy["result"], plain=True)
    _assert_same_bytes(state, world["cases"]["mixtral"]["model"].state_dict())
    _close(logits, world["cases"]["mixtral"]["reference"])


@pytest.mark.subprocess
def test_reverse_joins_stock_per_expert_names(world, tmp_path):
    """--reverse of save_pretrained's own mixtral checkpoint (w1/w2/w3 names) rebuilds the fused
    tensors; the router, under its legacy name, is copied as it is."""
    legacy = world["cases"]["mixtral_legacy"]
    convert_checkpoint(legacy["source"], tmp_path / "fused", reverse=True, progress=False)
    back, source = _checkpoint(tmp_path / "fused"), _checkpoint(legacy["source"])
    fused = {k: v for k, v in world["cases"]["mixtral"]["model"].state_dict().items() if ".experts." in k}
    _assert_same_bytes(back, {**{k: v for k, v in source.items() if k not in _expert_keys(source)}, **fused})


@pytest.fixture(scope="module")
def mixtral_state_dict_names(world, tmp_path_factory):
    """A per-expert mixtral checkpoint under the converted model's state-dict names
    (``mlp.experts.N.gate_proj``), as older ``defuser convert`` results hold them."""
    folder = tmp_path_factory.mktemp("mixtral_state_dict_names") / "per_expert"
    model = _build("mixtral")
    model.config.save_pretrained(folder)
    assert convert_model(model)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


@pytest.mark.subprocess
def test_reverse_joins_state_dict_names(world, mixtral_state_dict_names, tmp_path):
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in _checkpoint(mixtral_state_dict_names)
    convert_checkpoint(mixtral_state_dict_names, tmp_path / "fused", reverse=True, progress=False)
    _assert_same_bytes(_checkpoint(tmp_path / "fused"), _checkpoint(world["cases"]["mixtral"]["source"]))


@pytest.mark.subprocess
def test_reverse_refuses_a_tensor_under_both_names(mixtral_state_dict_names, tmp_path):
    source = tmp_path / "both"
    shutil.copytree(mixtral_state_dict_names, source)
    tensors = _checkpoint(source)
    twice = tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = twice
    save_file({k: v.clone() for k, v in tensors.items()}, source / "model.safetensors")
    with pytest.raises(OfflineConversionError, match=r"holds the same per-expert tensor twice, as .*experts\.3\.w2"):
        convert_checkpoint(source, tmp_path / "out", reverse=True, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_reverse_names_a_missing_piece_by_both_names(mixtral_state_dict_names, tmp_path):
    source = tmp_path / "missing"
    shutil.copytree(mixtral_state_dict_names, source)
    tensors = _checkpoint(source)
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file({k: v.clone() for k, v in tensors.items()}, source / "model.safetensors")
    missing = (
        r"'model\.layers\.0\.block_sparse_moe\.experts\.5\.w3\.weight' or "
        r"'model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight' is missing"
    )
    with pytest.raises(OfflineConversionError, match=missing):
        convert_checkpoint(source, tmp_path / "out", reverse=True, progress=False)


@pytest.mark.subprocess
def test_fused_and_per_expert_copies_of_one_tensor_are_refused(world, tmp_path):
    """A fused source that also holds a piece under defuser's name would yield that piece
    twice, under its saved name too."""
    source = tmp_path / "fused"
    shutil.copytree(world["cases"]["mixtral"]["source"], source)
    tensors = _checkpoint(source)
    tensors["model.layers.0.mlp.experts.2.gate_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, source / "model.safetensors")
    piece = r"'[^']*\.experts\.2\.(w1|gate_proj)\.weight'"
    with pytest.raises(OfflineConversionError, match=f"one per-expert tensor, as {piece} and {piece}, twice"):
        plan_conversion(source, tmp_path / "out")


def _skip_without_identity_rows(rows: dict[str, torch.Tensor]) -> None:
    if not rows:  # transformers 5.25.0 moved them out of the experts, into LongcatFlashMoE
        pytest.skip("LongCat-Flash's fused experts hold no identity-expert rows in this transformers")


def test_identity_expert_rows_are_left_out_and_come_back_as_zeros(tmp_path, caplog):
    """Non-zero identity rows (the tiny model's random init) are left out with a warning, the
    rest is exact, and --reverse writes zeros there (what fuse_model does)."""
    model = _build("longcat_flash", zero_identity_rows=False)
    rows = _identity_rows(model)
    _skip_without_identity_rows(rows)
    assert rows and all(bool(tensor.any()) for tensor in rows.values())
    _write_fused(model, tmp_path / "fused", "state_dict")
    with caplog.at_level(logging.WARNING, logger="defuser.offline"):
        report = convert_checkpoint(tmp_path / "fused", tmp_path / "per_expert", progress=False)
    assert "hold non-zero identity-expert rows, which are left out" in caplog.text
    identity = sum(step.identity_elements for step in report.plan.steps)
    assert identity == sum(tensor.numel() for tensor in rows.values())
    _assert_same_bytes(_checkpoint(tmp_path / "per_expert"), _saved_state_dict(_build("longcat_flash", False)))
    convert_checkpoint(tmp_path / "per_expert", tmp_path / "back", reverse=True, progress=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for key, tensor in rows.items():
        expected[key][-tensor.shape[0] :] = 0
    _assert_same_bytes(_checkpoint(tmp_path / "back"), expected)


@pytest.mark.subprocess
def test_identity_rows_are_accounted_for_explicitly(world, tmp_path):
    """The element-count check allows exactly the declared identity rows to go missing."""
    _skip_without_identity_rows(_identity_rows(_build("longcat_flash")))
    plan = plan_conversion(world["cases"]["longcat_flash"]["source"], tmp_path / "out")
    split = next(step for step in plan.steps if step.identity_elements)
    index = next(i for i, step in enumerate(plan.shards[0].steps) if step is split)
    plan.shards[0].steps[index] = dataclasses.replace(split, identity_elements=0)
    with pytest.raises(OfflineConversionError, match=r"elements read, \d+ written"):
        execute_plan(plan, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_hub_layout_prefix_and_transpose_are_detected(world):
    plan = plan_conversion(world["cases"]["qwen3_vl_moe"]["source"], world["root"] / "unused")
    assert plan.prefixes == ("model.", "")
    splits = [step for step in plan.steps if step.kind == "split"]
    assert splits and all(step.transposed for step in splits)
    assert splits[0].outputs[0].name.startswith("model.language_model.layers.0.mlp.experts.0.")


def test_sharded_source(tmp_path):
    model = build_tiny_model("gpt_oss")
    source, result, back = tmp_path / "fused", tmp_path / "per_expert", tmp_path / "back"
    source.mkdir()
    model.save_pretrained(source, max_shard_size="150KB")
    source_index = json.loads((source / "model.safetensors.index.json").read_text())
    source_shards = sorted(set(source_index["weight_map"].values()))
    assert len(source_shards) >= 3
    plan = convert_checkpoint(source, result, progress=False).plan
    index = json.loads((result / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in result.glob("*.safetensors")) == shards
    written = {shard: load_file(result / shard) for shard in shards}
    assert index["weight_map"] == {key: shard for shard, tensors in written.items() for key in tensors}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for tensors in written.values() for t in tensors.values()
    )
    # Each output shard holds what its source shard held, so it is no bigger (bar the header).
    for output, shard in zip(plan.shards, plan.checkpoint.shards, strict=True):
        assert output.nbytes == sum(e.nbytes for e in plan.checkpoint.tensors.values() if e.file.name == shard)
    expected = build_tiny_model("gpt_oss")
    assert convert_model(expected)
    _assert_same_bytes(_checkpoint(result), expected.state_dict())
    convert_checkpoint(result, back, reverse=True, progress=False)
    _assert_same_bytes(_checkpoint(back), _checkpoint(source))


def test_reverse_joins_experts_spread_over_shards(tmp_path):
    model = build_tiny_model("qwen3_moe")
    source, back = tmp_path / "per_expert", tmp_path / "fused"
    model.save_pretrained(source, max_shard_size="40KB")  # transformers writes qwen3_moe per expert
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    gate_keys = [f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight" for layer in (0, 1) for e in range(8)]
    gate_shards = {weight_map[key] for key in gate_keys}
    assert len(gate_shards) >= 2  # the pieces of at least one fused tensor live in different files
    convert_checkpoint(source, back, reverse=True, progress=False)
    _assert_same_bytes(_checkpoint(back), model.state_dict())


def _interrupting_write(monkeypatch, after: int) -> None:
    original = ShardWriter.write
    calls = {"count": 0}

    def write(self, name, tensor):
        calls["count"] += 1
        if calls["count"] > after:
            raise RuntimeError("simulated failure mid-way")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)


def _leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.defuser-")]


@pytest.fixture(scope="module")
def gpt_oss_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss") / "fused"
    _write_fused(build_tiny_model("gpt_oss"), folder, "save_pretrained")
    return folder


def test_interrupted_conversion_leaves_no_destination(gpt_oss_source, tmp_path, monkeypatch):
    _interrupting_write(monkeypatch, after=20)
    destination = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated failure"):
        convert_checkpoint(gpt_oss_source, destination, progress=False)
    assert not destination.exists()
    assert _leftovers(tmp_path, "out") == []


def test_interrupted_overwrite_keeps_the_old_destination(gpt_oss_source, tmp_path, monkeypatch):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("old")
    _interrupting_write(monkeypatch, after=20)
    with pytest.raises(RuntimeError, match="simulated failure"):
        convert_checkpoint(gpt_oss_source, destination, overwrite=True, progress=False)
    assert sorted(p.name for p in destination.iterdir()) == ["config.json"]
    assert (destination / "config.json").read_text() == "old"
    assert _leftovers(tmp_path, "out") == []


def test_existing_destination_needs_overwrite(gpt_oss_source, tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "model.safetensors").write_text("old")
    (destination / "old-notes.txt").write_text("old")
    with pytest.raises(OfflineConversionError, match=r"already exists .*--overwrite"):
        convert_checkpoint(gpt_oss_source, destination, progress=False)
    assert (destination / "old-notes.txt").exists()
    convert_checkpoint(gpt_oss_source, destination, overwrite=True, progress=False)
    assert not (destination / "old-notes.txt").exists() and (destination / "config.json").exists()
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("inside", ["", "sub", "sub/deeper"])
def test_destination_in_source_is_refused_even_with_overwrite(gpt_oss_source, inside):
    before = sorted(p.name for p in gpt_oss_source.iterdir())
    with pytest.raises(OfflineConversionError, match="must not be SRC or a folder inside it"):
        convert_checkpoint(gpt_oss_source, gpt_oss_source / inside, overwrite=True, progress=False)
    assert sorted(p.name for p in gpt_oss_source.iterdir()) == before


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "a/../../x.safetensors"])
def test_index_entry_outside_source_is_refused(gpt_oss_source, tmp_path, shard):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((gpt_oss_source / name).read_bytes())
    (tmp_path / "x.safetensors").write_bytes((gpt_oss_source / "model.safetensors").read_bytes())
    keys = list(load_file(source / "model.safetensors"))
    weight_map = {key: "model.safetensors" for key in keys}
    weight_map[keys[0]] = shard
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(OfflineConversionError, match="points outside"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_pickle_weights_are_refused(tmp_path):
    source = tmp_path / "src"
    build_tiny_model("qwen3_moe").config.save_pretrained(source)
    (source / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OfflineConversionError, match=r"pytorch_model\.bin; defuser convert reads safetensors only"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_malformed_safetensors_header_is_refused(gpt_oss_source, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_bytes((gpt_oss_source / "config.json").read_bytes())
    (source / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(OfflineConversionError, match="not a valid safetensors file"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_other_files_are_copied_and_stray_weights_left_out(gpt_oss_source, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for path in gpt_oss_source.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    (source / "consolidated.safetensors").write_bytes((gpt_oss_source / "model.safetensors").read_bytes())
    (source / "extra").mkdir()
    (source / "extra" / "notes.txt").write_text("kept")
    plan = convert_checkpoint(source, tmp_path / "out", progress=False).plan
    assert plan.skipped == ["consolidated.safetensors"]
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    copied = ["config.json", "extra/notes.txt", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert written == copied


def test_every_source_tensor_must_be_accounted_for(gpt_oss_source, tmp_path):
    plan = plan_conversion(gpt_oss_source, tmp_path / "out")
    entry = next(iter(plan.checkpoint.tensors.values()))
    plan.checkpoint.tensors["phantom"] = entry  # a source tensor no step writes
    with pytest.raises(OfflineConversionError, match="'phantom' is not written"):
        execute_plan(plan, progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_fused_keys_under_unmatched_module_paths_are_refused(tmp_path):
    model = build_tiny_model("qwen3_moe")
    source = tmp_path / "src"
    model.config.save_pretrained(source)
    renamed = {k.replace(".mlp.", ".moe."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(renamed, source / "model.safetensors")
    with pytest.raises(OfflineConversionError, match=r"model\.layers\.1\.moe\.experts\.\w+' looks like a fused"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


@pytest.mark.subprocess
def test_cli_dry_run_writes_nothing(gpt_oss_source, tmp_path):
    binary = Path(sys.executable).parent / "defuser"
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "defuser.cli"]
    destination = tmp_path / "out"
    done = subprocess.run(
        [*command, "convert", str(gpt_oss_source), str(destination), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "model.layers.*.mlp.experts.gate_up_proj" in done.stdout and "-> 16 tensors each" in done.stdout
    # 2 layers x (gate_up + its bias: 16 pieces each, down + its bias: 8 each)
    assert "split: 8 fused tensors into 96 per-expert tensors" in done.stdout
    assert "dry run: nothing written" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(gpt_oss_source, tmp_path, capsys):
    from defuser.cli import main

    assert main(["convert", str(gpt_oss_source), str(gpt_oss_source)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("defuser convert: error: ") and "must not be SRC" in error and "\n" not in error
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_cli_converts_and_reverses(gpt_oss_source, tmp_path, capsys, monkeypatch):
    from defuser.cli import main

    monkeypatch.setenv("TQDM_DISABLE", "1")  # --quiet sets it; restored after the test

    result, back = tmp_path / "per_expert", tmp_path / "back"
    assert main(["--quiet", "convert", str(gpt_oss_source), str(result)]) == 0
    assert f"wrote {result}" in capsys.readouterr().out
    assert main(["--quiet", "convert", str(result), str(back), "--reverse"]) == 0
    assert "joined: 96 per-expert tensors into 8 fused tensors" in capsys.readouterr().out
    _assert_same_bytes(_checkpoint(back), _checkpoint(gpt_oss_source))


# -- hardening: files the checkpoint links to, killed runs, replacing, configs far off, errors --


def _copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_linked_file_outside_the_source_is_refused(gpt_oss_source, tmp_path):
    source = _copy_folder(gpt_oss_source, tmp_path / "src")
    secret = tmp_path / "elsewhere.json"
    secret.write_text('{"private": true}')
    (source / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(OfflineConversionError, match=r"tokenizer_config\.json: a symlink to .*elsewhere\.json"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("special", ["dev-zero", "fifo", "dangling"])
def test_a_file_that_is_not_a_regular_file_is_refused(gpt_oss_source, tmp_path, special):
    import os

    source = _copy_folder(gpt_oss_source, tmp_path / "src")
    odd = source / "tokenizer_config.json"
    if special == "dev-zero":
        odd.symlink_to("/dev/zero")  # copied until the disk is full, before
    elif special == "fifo":
        os.mkfifo(odd)  # a copy would wait for a writer forever
    else:
        odd.symlink_to(source / "gone.json")
    with pytest.raises(OfflineConversionError, match=r"tokenizer_config\.json: (a symlink|not a regular file)"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_shard_linked_outside_the_source_is_refused_by_the_same_rule(gpt_oss_source, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_bytes((gpt_oss_source / "config.json").read_bytes())
    (source / "model.safetensors").symlink_to(gpt_oss_source / "model.safetensors")
    with pytest.raises(OfflineConversionError, match=r"model\.safetensors: a symlink to .* outside"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_a_hub_cache_snapshot_of_links_into_blobs_converts(gpt_oss_source, tmp_path):
    repo = tmp_path / "models--tiny--gpt-oss"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in gpt_oss_source.iterdir():
        blob = blobs / f"blob-{path.name}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    destination = tmp_path / "out"
    convert_checkpoint(snapshot, destination, progress=False)
    assert (destination / "tokenizer.json").is_file() and not (destination / "tokenizer.json").is_symlink()
    assert (destination / "tokenizer.json").read_text() == (gpt_oss_source / "tokenizer.json").read_text()


# A child process that converts and is killed (SIGKILL: no cleanup can run) at a chosen moment:
# after `--writes` tensors were written, or right after the `--moves`-th rename touching DST.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from defuser.offline import convert_checkpoint
from defuser.offline import execute, safetensors_io
source, destination, kind, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = {"n": 0}

def kill_after(function, touches_destination=lambda *args: True):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if touches_destination(*args):
            calls["n"] += 1
            if calls["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if kind == "writes":
    safetensors_io.ShardWriter.write = kill_after(safetensors_io.ShardWriter.write)
else:
    moves_destination = lambda *paths: any(Path(p) == destination for p in paths[:2])
    os.rename = kill_after(os.rename, moves_destination)
    os.replace = kill_after(os.replace, moves_destination)
    try:
        from defuser.offline import workspace
    except ImportError:
        workspace = None
    if workspace is not None:
        if kind == "moves-without-exchange":
            workspace.exchange = lambda first, second: False
        else:
            workspace.exchange = kill_after(workspace.exchange, moves_destination)
convert_checkpoint(source, destination, overwrite=True, progress=False)
"""


def _killed_run(source: Path, destination: Path, kind: str, count: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(source), str(destination), kind, str(count)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr  # killed, as planned


def test_a_killed_run_leaves_a_marked_folder_that_the_next_run_removes(gpt_oss_source, tmp_path, caplog):
    from defuser.offline.workspace import MARKER_NAME

    destination = tmp_path / "out"
    _killed_run(gpt_oss_source, destination, "writes", 5)
    (left,) = _leftovers(tmp_path, "out")
    assert (tmp_path / left / MARKER_NAME).is_file(), "the temporary folder carries no marker"
    assert not destination.exists()
    unmarked = tmp_path / ".out.defuser-not-ours"  # our name, no marker: never removed
    unmarked.mkdir()
    (unmarked / "data").write_text("keep")
    with caplog.at_level(logging.WARNING, logger="defuser"):
        convert_checkpoint(gpt_oss_source, destination, progress=False)
    assert _leftovers(tmp_path, "out") == [unmarked.name] and (unmarked / "data").read_text() == "keep"
    assert f"removed {tmp_path / left}" in caplog.text
    assert (destination / "model.safetensors").is_file() and not (destination / MARKER_NAME).exists()


def test_the_folder_of_a_run_still_going_is_not_removed(tmp_path):
    from defuser.offline.workspace import Workspace, remove_stale_workspaces

    with Workspace(tmp_path, tmp_path / "out") as running:
        assert remove_stale_workspaces(tmp_path) == []
        assert running.folder.is_dir()
    assert list(tmp_path.iterdir()) == []


# RENAME_EXCHANGE moves DST once; without it (other systems) DST is moved twice.
@pytest.mark.parametrize(
    ("kind", "count"), [("moves", 1), ("moves-without-exchange", 1), ("moves-without-exchange", 2)]
)
def test_overwrite_killed_at_any_rename_keeps_a_destination(gpt_oss_source, tmp_path, kind, count):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("old")
    _killed_run(gpt_oss_source, destination, kind, count)
    from defuser.offline.workspace import remove_stale_workspaces

    remove_stale_workspaces(tmp_path)  # what the next run does first
    assert destination.is_dir(), "a killed --overwrite left no destination"
    old = (destination / "config.json").read_text() == "old" and len(list(destination.iterdir())) == 1
    new = (destination / "model.safetensors").is_file()
    assert old or new
    if new:  # complete: every shard reads back, per-expert tensors included
        assert any(".experts.0." in key for key in _checkpoint(destination))
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_names_what_it_replaces(gpt_oss_source, tmp_path, caplog):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("old")
    with caplog.at_level(logging.WARNING, logger="defuser"):
        convert_checkpoint(gpt_oss_source, destination, overwrite=True, progress=False)
    assert f"replaced {destination}" in caplog.text
    assert (destination / "model.safetensors").is_file()


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(gpt_oss_source, tmp_path):
    destination = tmp_path / "home"
    destination.mkdir()
    (destination / "thesis.tex").write_text("years of work")
    with pytest.raises(OfflineConversionError, match=r"home: holds no config\.json or safetensors file"):
        convert_checkpoint(gpt_oss_source, destination, overwrite=True, progress=False)
    assert (destination / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(gpt_oss_source, empty, overwrite=True, progress=False)
    assert (empty / "model.safetensors").is_file()


# Runs `defuser convert --dry-run` with its address space limited, so that a config that makes
# it build something huge fails fast with MemoryError instead of filling the machine.
LIMITED_RUN = """
import resource, sys
limit = int(sys.argv[1]) << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from defuser.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def mixtral_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral") / "fused"
    _write_fused(build_tiny_model("mixtral"), folder, "state_dict")
    return folder


@pytest.mark.parametrize("reverse", [False, True], ids=["fused", "per-expert-reverse"])
def test_a_config_far_from_its_checkpoint_is_refused_before_anything_large_is_built(mixtral_source, tmp_path, reverse):
    source = tmp_path / "src"
    if reverse:
        convert_checkpoint(mixtral_source, source, progress=False)
    else:
        _copy_folder(mixtral_source, source)
    config = json.loads((source / "config.json").read_text())
    assert config["num_local_experts"] == 8
    config["num_local_experts"] = 200_000
    (source / "config.json").write_text(json.dumps(config))
    arguments = ["convert", str(source), str(tmp_path / "out"), "--dry-run", *(["--reverse"] if reverse else [])]
    done = subprocess.run(
        [sys.executable, "-c", LIMITED_RUN, "3", *arguments], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1, done.stderr[-2000:]
    error = done.stderr.strip()
    assert error.startswith("defuser convert: error: ") and "\n" not in error, error[-2000:]
    assert "config.json: num_local_experts = 200000 does not fit the checkpoint" in error
    assert ("model.safetensors holds" in error) != reverse


def _header_file(path: Path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    ("where", "content", "message"),
    [
        ("header", b"[" * 200_000 + b"]" * 200_000, r"model\.safetensors: not a valid safetensors file \(.*too deep"),
        (
            "header",
            b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
            r"model\.safetensors: not a valid safetensors file \(.*digits",
        ),
        ("index", b"[" * 200_000 + b"]" * 200_000, r"model\.safetensors\.index\.json: JSON nested too deep"),
        (
            "config",
            b'{"model_type": "gpt_oss", "num_local_experts": ' + b"9" * 5000 + b"}",
            r"config\.json: unreadable JSON \(.*digits",
        ),
        ("config", b'{"model_type": ["gpt_oss"]}', r"config\.json: field model_type is \['gpt_oss'\], not a string"),
        (
            "config",
            b'{"model_type": "gpt_oss", "text_config": {"model_type": {}}}',
            r"config\.json: field text_config\.model_type is \{\}, not a string",
        ),
    ],
    ids=["deep-header", "long-int-header", "deep-index", "long-int-config", "list-model-type", "dict-model-type"],
)
def test_unreadable_files_get_one_line_naming_file_and_field(gpt_oss_source, tmp_path, capsys, where, content, message):
    from defuser.cli import main

    source = _copy_folder(gpt_oss_source, tmp_path / "src")
    if where == "header":
        _header_file(source / "model.safetensors", content)
    elif where == "index":
        (source / "model.safetensors.index.json").write_bytes(content)
    else:
        (source / "config.json").write_bytes(content)
    assert main(["convert", str(source), str(tmp_path / "out"), "--dry-run"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("defuser convert: error: ") and "\n" not in error, error[:500]
    assert re.search(message, error), error[:500]


class _FullDisk:
    """A file object whose writes fail as on a full disk once ``room`` bytes are written."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        import errno
        import os

        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_a_full_disk_names_the_file_being_written(gpt_oss_source, tmp_path, capsys, monkeypatch):
    from defuser.cli import main
    from defuser.offline import safetensors_io

    def full_disk_open(path, mode="r"):
        return _FullDisk(open(path, mode), 4096) if "w" in mode else open(path, mode)

    monkeypatch.setattr(safetensors_io, "open", full_disk_open, raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # --quiet sets it; restored after the test
    assert main(["--quiet", "convert", str(gpt_oss_source), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("defuser convert: error: ") and "\n" not in error
    assert re.search(r"/model\.safetensors: cannot write \(No space left on device, errno 28\)", error), error
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_an_interrupt_between_the_two_renames_puts_the_old_destination_back(gpt_oss_source, tmp_path, monkeypatch):
    import os

    from defuser.offline import workspace

    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("old")
    monkeypatch.setattr(workspace, "exchange", lambda first, second: False)  # a system without RENAME_EXCHANGE
    rename, moves = os.rename, []

    def interrupted_second_move(source, target):
        moves.append(target)
        if len(moves) == 2:  # DST -> old/ done, new/ -> DST not yet
            raise KeyboardInterrupt("SIGTERM between the renames")
        return rename(source, target)

    monkeypatch.setattr(workspace.os, "rename", interrupted_second_move)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(gpt_oss_source, destination, overwrite=True, progress=False)
    assert (destination / "config.json").read_text() == "old" and len(list(destination.iterdir())) == 1
    assert _leftovers(tmp_path, "out") == []
