"""``defuser convert`` fast paths: per-expert slices copied as byte ranges (with and without the
kernel's copy calls), output shards written by several jobs, and one conversion split over
machines with ``--shards I/N`` then ``--merge``.  Every fast path must give files byte for byte
equal to the decoding path, which is the conversion as it was before them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import save_file

from defuser.cli import main
from defuser.offline import convert_checkpoint, plan_conversion, ranges
from defuser.offline.model_layout import FusedSpec
from defuser.tiny import build_tiny_model


def _write_sharded(model_type: str, folder: Path, shards: int) -> Path:
    """The tiny model's fused state dict in ``shards`` files with an index, plus a tokenizer file."""
    model = build_tiny_model(model_type)
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    names = list(state)
    size = -(-len(names) // shards)
    weight_map = {}
    for number in range(shards):
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[number * size : (number + 1) * size]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory) -> Path:
    return _write_sharded("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "fused", 4)


@pytest.fixture(scope="module")
def gpt_oss_source(tmp_path_factory) -> Path:
    """Decoded weights (interleaved gate-up, down stored [E, in, out]) beside biases copied as
    byte ranges, in 3 files."""
    return _write_sharded("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "fused", 3)


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, qwen_source, gpt_oss_source) -> dict[str, dict[str, bytes]]:
    """Both sources converted with every split decoded (no byte ranges): the reference."""
    root = tmp_path_factory.mktemp("decoded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FusedSpec, "piece_ranges", lambda self, element_size, transposed=False: None)
        for name, source in (("qwen3_moe", qwen_source), ("gpt_oss", gpt_oss_source)):
            report = convert_checkpoint(source, root / name, progress=False)
            assert all(step.ranges is None for step in report.plan.steps)
        report = convert_checkpoint(root / "qwen3_moe", root / "qwen3_moe_back", reverse=True, progress=False)
        assert all(step.ranges is None for step in report.plan.steps)
    return {name: _files(root / name) for name in ("qwen3_moe", "gpt_oss", "qwen3_moe_back")}


def test_zero_copy_splits_are_planned_as_byte_ranges(qwen_source, gpt_oss_source, tmp_path):
    qwen = plan_conversion(qwen_source, tmp_path / "a")
    splits = [step for step in qwen.steps if step.kind == "split"]
    assert splits and all(step.ranges is not None for step in splits)
    # Ranges tile the stored tensor in order: expert e's gate, its up, then expert e+1.
    for step in splits:
        entry = qwen.checkpoint.tensors[step.sources[0]]
        offsets = [offset for offset, _ in step.ranges]
        assert offsets == [sum(count for _, count in step.ranges[:i]) for i in range(len(step.ranges))]
        assert sum(count for _, count in step.ranges) == entry.nbytes
    gpt_oss = plan_conversion(gpt_oss_source, tmp_path / "b")
    by_kind = {
        step.sources[0].rsplit(".", 1)[-1]: step.ranges is not None for step in gpt_oss.steps if step.kind == "split"
    }
    # Interleaved gate and up rows, and down weights stored [E, in, out]: decoded.
    assert by_kind["gate_up_proj"] is False and by_kind["down_proj"] is False
    assert by_kind["down_proj_bias"] is True


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_byte_ranges_give_the_files_decoding_gives(model_type, qwen_source, gpt_oss_source, decoded, tmp_path):
    source = qwen_source if model_type == "qwen3_moe" else gpt_oss_source
    convert_checkpoint(source, tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == decoded[model_type]


def test_joins_from_byte_ranges_give_the_files_decoding_gives(qwen_source, decoded, tmp_path):
    result, back = tmp_path / "per_expert", tmp_path / "back"
    convert_checkpoint(qwen_source, result, progress=False)
    report = convert_checkpoint(result, back, reverse=True, progress=False)
    joins = [step for step in report.plan.steps if step.kind == "join"]
    assert joins and all(step.ranges is not None for step in joins)
    assert _files(back) == decoded["qwen3_moe_back"]


def test_the_plan_says_which_tensors_are_copied_as_bytes(gpt_oss_source, tmp_path):
    from defuser.offline import format_plan

    text = format_plan(plan_conversion(gpt_oss_source, tmp_path / "out"))
    assert re.search(r"experts\.gate_up_proj .*-> 16 tensors each \(decoded\)", text), text
    assert re.search(r"experts\.down_proj_bias .*-> 8 tensors each \(byte ranges\)", text), text


@pytest.mark.parametrize(
    "missing", [("copy_file_range",), ("copy_file_range", "sendfile")], ids=["sendfile", "buffers"]
)
def test_without_the_kernel_copy_calls_the_files_are_the_same(missing, qwen_source, decoded, tmp_path, monkeypatch):
    import shutil

    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False, raising=False)  # copying config.json uses it
    monkeypatch.setattr(ranges, "_refused", set())
    monkeypatch.setattr(ranges, "_buffers", {})
    monkeypatch.setattr(ranges, "CHUNK_BYTES", 4096)  # many chunks: the read-ahead thread runs
    assert all(name not in ranges.methods_available() for name in missing)
    convert_checkpoint(qwen_source, tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == decoded["qwen3_moe"]


def test_a_refused_kernel_copy_falls_back(qwen_source, decoded, tmp_path, monkeypatch):
    import errno

    def cross_device(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    monkeypatch.setattr(ranges, "_refused", set())
    convert_checkpoint(qwen_source, tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == decoded["qwen3_moe"]
    assert "copy_file_range" not in ranges.methods_available()


def test_a_full_disk_during_a_kernel_copy_names_the_file(qwen_source, tmp_path, monkeypatch):
    import errno

    from defuser.offline import OfflineConversionError

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full, raising=False)
    monkeypatch.setattr(ranges, "_refused", set())
    message = r"model-00001-of-00004\.safetensors: cannot write \(No space left on device, errno 28\)"
    with pytest.raises(OfflineConversionError, match=message):
        convert_checkpoint(qwen_source, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # no DST, no temporary folder


def test_a_truncated_source_is_named(qwen_source, tmp_path):
    import shutil

    source = Path(shutil.copytree(qwen_source, tmp_path / "src"))
    plan = plan_conversion(source, tmp_path / "out")
    shard = source / plan.checkpoint.shards[-1]
    with open(shard, "r+b") as handle:  # cut after planning: the header was whole when read
        handle.truncate(shard.stat().st_size - 16)
    from defuser.offline import OfflineConversionError, execute_plan

    with pytest.raises(OfflineConversionError, match=rf"{shard.name}: file ends early"):
        execute_plan(plan, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_two_jobs_write_the_files_one_job_writes(model_type, qwen_source, gpt_oss_source, decoded, tmp_path):
    source = qwen_source if model_type == "qwen3_moe" else gpt_oss_source
    report = convert_checkpoint(source, tmp_path / "out", progress=False, jobs=2)
    assert len(report.plan.shards) >= 3
    assert _files(tmp_path / "out") == decoded[model_type]


@pytest.mark.subprocess
def test_spawned_jobs_write_the_same_files(qwen_source, decoded, tmp_path, monkeypatch):
    """Where the system cannot fork, the jobs are spawned and get the plan pickled."""
    import multiprocessing

    from defuser.offline import execute

    monkeypatch.setattr(execute, "_job_context", lambda: multiprocessing.get_context("spawn"))
    convert_checkpoint(qwen_source, tmp_path / "out", progress=False, jobs=2)
    assert _files(tmp_path / "out") == decoded["qwen3_moe"]


@pytest.mark.subprocess
def test_an_error_in_a_job_is_raised_and_leaves_nothing(qwen_source, tmp_path, monkeypatch):
    from defuser.offline import OfflineConversionError, safetensors_io

    def failing(self, name, source, start, nbytes):
        raise OfflineConversionError(f"{self.path.name}: simulated failure")

    monkeypatch.setattr(safetensors_io.ShardWriter, "copy_range", failing)  # forked jobs inherit it
    with pytest.raises(OfflineConversionError, match=r"model-0000\d-of-0000\d\.safetensors: simulated failure"):
        convert_checkpoint(qwen_source, tmp_path / "out", progress=False, jobs=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
def test_a_job_that_dies_is_named_and_leaves_nothing(qwen_source, tmp_path, monkeypatch):
    from defuser.offline import OfflineConversionError, execute

    monkeypatch.setattr(execute, "_write_shard", lambda *args, **kwargs: os._exit(3))  # as if killed
    with pytest.raises(OfflineConversionError, match=r"conversion job \d+ ended without finishing .*exit code 3"):
        convert_checkpoint(qwen_source, tmp_path / "out", progress=False, jobs=2)
    assert list(tmp_path.iterdir()) == []


def _run(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["--quiet", "convert", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_parts_then_merge_equal_one_conversion(qwen_source, decoded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    destination = tmp_path / "out"
    for number in (2, 1, 3):  # any order
        code, out, err = _run(capsys, str(qwen_source), str(destination), "--shards", f"{number}/3", "--jobs", "1")
        assert code == 0, err
        folder = tmp_path / f"out.part-{number}-of-3"
        assert f"wrote {folder}" in out and folder.is_dir() and not destination.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"out.part-{n}-of-3" for n in (1, 2, 3)]
    code, out, err = _run(capsys, str(qwen_source), str(destination), "--merge")
    assert code == 0, err
    assert _files(destination) == decoded["qwen3_moe"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # the parts are gone once DST is in place


def test_merge_refuses_missing_foreign_and_mixed_parts(qwen_source, gpt_oss_source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    destination = tmp_path / "out"
    code, _, err = _run(capsys, str(qwen_source), str(destination), "--merge")
    assert code == 1 and f"{destination}.part-I-of-N: no such part folders" in err
    assert _run(capsys, str(qwen_source), str(destination), "--shards", "1/2", "--jobs", "1")[0] == 0
    code, _, err = _run(capsys, str(qwen_source), str(destination), "--merge")
    assert code == 1 and f"{tmp_path / 'out.part-2-of-2'}: missing; part 2/2 is not converted yet" in err
    # Part 2 of another source (same shard names, other tensors): refused by its plan.
    assert _run(capsys, str(gpt_oss_source), str(destination), "--shards", "2/2", "--jobs", "1")[0] == 0
    code, _, err = _run(capsys, str(qwen_source), str(destination), "--merge")
    assert code == 1 and f"{tmp_path / 'out.part-2-of-2'}: made from a different plan" in err
    assert not destination.exists() and (tmp_path / "out.part-1-of-2").is_dir()
    (tmp_path / "out.part-1-of-3").mkdir()
    code, _, err = _run(capsys, str(qwen_source), str(destination), "--merge")
    assert code == 1 and "for different counts (of-2, of-3)" in err
    assert "\n" not in err.strip()


def test_more_parts_than_output_shards_is_refused(qwen_source, tmp_path, capsys):
    code, _, err = _run(capsys, str(qwen_source), str(tmp_path / "out"), "--shards", "5/5")
    assert code == 1 and "--shards 5/5: the result has 4 output shard(s), so it splits into at most 4 part(s)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--shards", "0/3"], "I must be between 1 and N (3)"),
        (["--shards", "4/3"], "I must be between 1 and N (3)"),
        (["--shards", "1/0"], "N must be 1 or more"),
        (["--shards", "a/b"], "expected I/N (part I of N, e.g. 1/4), got 'a/b'"),
        (["--shards", "1/2", "--merge"], "not allowed with argument --shards"),
        (["--jobs", "0"], "must be 1 or more, got 0"),
        (["--jobs", "-2"], "must be 1 or more, got -2"),
        (["--jobs", "many"], "expected a whole number of 1 or more, got 'many'"),
    ],
)
def test_bad_shards_and_jobs_are_usage_errors(qwen_source, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as stopped:
        main(["convert", str(qwen_source), str(tmp_path / "out"), *arguments])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message in error and ("--shards" in error or "--jobs" in error or "--merge" in error)
    assert list(tmp_path.iterdir()) == []
