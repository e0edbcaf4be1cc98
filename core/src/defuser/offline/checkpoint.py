"""The checkpoint folders: opening a source (``model.safetensors`` or an index and its shards,
with shard names kept inside the folder), the other files that travel with it, the names of
output shards, and the checks a destination must pass."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from defuser.offline.safetensors_io import OfflineConversionError, TensorEntry, read_safetensors_header

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "Checkpoint",
    "check_destination",
    "checked_file",
    "load_json",
    "open_checkpoint",
    "other_files",
    "shard_file_names",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_WEIGHT_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES, ".safetensors.index.json", ".bin.index.json", ".pt.index.json")


@dataclass
class Checkpoint:
    """A local safetensors checkpoint: its shards (file names relative to the folder, in order)
    and every tensor by key."""

    folder: Path
    shards: list[str]
    tensors: dict[str, TensorEntry]
    shard_of: dict[str, str]
    metadata: dict[str, dict[str, str] | None]
    index_metadata: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(entry.nbytes for entry in self.tensors.values())


def _link_roots(folder: Path) -> list[Path]:
    """Where a symlink in ``folder`` may point: into the folder itself or, for a snapshot of the
    hub cache (``<repo>/snapshots/<revision>``), into that repository's ``blobs`` folder, which
    is where the hub's symlinks lead."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def checked_file(folder: Path, relative: str) -> Path:
    """``folder / relative`` once it is known to be a regular file: one rule for every file of a
    checkpoint (shards, index, config, the files copied with them).  A symlink is followed only
    when it ends inside ``folder`` or, in the hub cache, inside the repository's ``blobs``;
    devices, FIFOs, folders, dangling links and links elsewhere are refused, naming the file."""
    path = folder / relative
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise OfflineConversionError(f"{path}: no such file") from None
    if stat.S_ISLNK(info.st_mode) or path.resolve() != path.absolute():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            leads_to = os.readlink(path) if path.is_symlink() else "a loop"
            raise OfflineConversionError(f"{path}: a symlink that leads nowhere ({leads_to})") from None
        roots = _link_roots(folder)
        if not any(target == root or root in target.parents for root in roots):
            raise OfflineConversionError(
                f"{path}: a symlink to {target}, outside {folder}; only links into the checkpoint folder "
                "(or the hub cache's blobs) are followed"
            )
        info = target.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OfflineConversionError(f"{path}: not a regular file (a device, FIFO, socket or folder); not read")
    return path


def load_json(path: Path) -> Any:
    """The JSON document in the regular file ``path``; an error names the file for bad text,
    nesting too deep for Python's parser, or an integer beyond Python's digit limit."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OfflineConversionError(f"{path}: not JSON ({error})") from None
    except RecursionError:
        raise OfflineConversionError(f"{path}: JSON nested too deep to read") from None
    except ValueError as error:  # an integer beyond sys.get_int_max_str_digits()
        raise OfflineConversionError(f"{path}: unreadable JSON ({str(error).split(';')[0]})") from None


def _safe_shard_name(folder: Path, key: str, name: object) -> str:
    """``name`` from the index as a relative POSIX path, refused when it could reach outside
    ``folder`` (absolute, drive, ``..``, ``~``, backslashes) or is no safetensors file."""
    if not isinstance(name, str) or not name:
        raise OfflineConversionError(f"{folder / INDEX_NAME}: tensor {key!r} maps to {name!r}, not a file name")
    posix = PurePosixPath(name)
    outside = (
        "\\" in name
        or posix.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in posix.parts
        or posix.parts[:1] == ("~",)
    )
    if outside:
        raise OfflineConversionError(f"{folder / INDEX_NAME}: shard {name!r} (tensor {key!r}) points outside {folder}")
    if not name.endswith(".safetensors"):
        raise OfflineConversionError(
            f"{folder / INDEX_NAME}: shard {name!r} is not a .safetensors file; defuser convert reads safetensors only"
        )
    return posix.as_posix()


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read the headers of the checkpoint in ``folder`` (``model.safetensors`` or the shards named
    by ``model.safetensors.index.json``); no tensor data is read.  Pickle formats are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OfflineConversionError(f"{folder}: no such folder")
    index_path = folder / INDEX_NAME
    if index_path.is_symlink() or index_path.exists():
        index = load_json(checked_file(folder, INDEX_NAME))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise OfflineConversionError(f"{index_path}: no weight_map")
        wanted = {key: _safe_shard_name(folder, key, name) for key, name in weight_map.items()}
        shards = sorted(set(wanted.values()))
        index_metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    elif (folder / SINGLE_NAME).is_symlink() or (folder / SINGLE_NAME).exists():
        wanted, shards, index_metadata = None, [SINGLE_NAME], None
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise OfflineConversionError(
                f"{folder}: holds {', '.join(pickles)}; defuser convert reads safetensors only (no pickle)"
            )
        raise OfflineConversionError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}")
    tensors: dict[str, TensorEntry] = {}
    shard_of: dict[str, str] = {}
    metadata: dict[str, dict[str, str] | None] = {}
    for shard in shards:
        path = folder / shard
        if not (path.is_symlink() or path.exists()):
            raise OfflineConversionError(f"{folder}: shard {shard} named by {INDEX_NAME} is missing")
        checked_file(folder, shard)
        entries, metadata[shard] = read_safetensors_header(path)
        for key, entry in entries.items():
            if wanted is not None and wanted.get(key) != shard:
                raise OfflineConversionError(
                    f"{path}: holds tensor {key!r}, which {INDEX_NAME} maps to {wanted.get(key, 'no shard')}"
                )
            if key in tensors:
                raise OfflineConversionError(f"{folder}: tensor {key!r} is in both {shard_of[key]} and {shard}")
            tensors[key] = entry
            shard_of[key] = shard
    if wanted is not None:
        missing = [key for key in wanted if key not in tensors]
        if missing:
            key = missing[0]
            raise OfflineConversionError(f"{folder}: tensor {key!r} is in {INDEX_NAME} but not in {wanted[key]}")
    return Checkpoint(folder, shards, tensors, shard_of, metadata, index_metadata)


def other_files(checkpoint: Checkpoint) -> tuple[list[str], list[str]]:
    """Non-weight files to copy (hidden folders such as ``.cache`` left out) and weight files
    skipped, relative to the folder; each file to copy passes :func:`checked_file` (links to
    folders are not walked)."""
    used = {*checkpoint.shards, INDEX_NAME}
    files: list[str] = []
    skipped: list[str] = []
    for root, folders, names in os.walk(checkpoint.folder):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(names):
            relative = (Path(root) / name).relative_to(checkpoint.folder).as_posix()
            if relative in used:
                continue
            if name.endswith(_WEIGHT_SUFFIXES):
                skipped.append(relative)
            else:
                checked_file(checkpoint.folder, relative)
                files.append(relative)
    return files, skipped


def shard_file_names(count: int) -> list[str]:
    """The hub's file names for a checkpoint of ``count`` shards."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def _looks_like_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a ``config.json`` or safetensors weights (or nothing at all)."""
    names = [path.name for path in folder.iterdir()]
    return not names or any(name == "config.json" or name.endswith((".safetensors", INDEX_NAME)) for name in names)


def check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    """Refuse a destination that is, holds or lies inside ``source``, one that exists (unless
    ``overwrite``, and then only a real folder that is empty or looks like a checkpoint), or one
    whose parent is missing or read-only."""
    real_source, real_destination = source.resolve(), destination.resolve()
    if real_destination == real_source or real_source in real_destination.parents:
        raise OfflineConversionError(f"{destination}: DST must not be SRC or a folder inside it")
    if real_destination in real_source.parents:
        raise OfflineConversionError(f"{destination}: DST must not contain SRC")
    if destination.is_symlink() or destination.exists():
        if not overwrite:
            raise OfflineConversionError(f"{destination}: already exists (use --overwrite to replace it)")
        if destination.is_symlink() or not destination.is_dir():
            raise OfflineConversionError(f"{destination}: exists as a file or link, not a folder; not replaced")
        if not _looks_like_checkpoint(destination):
            raise OfflineConversionError(
                f"{destination}: holds no config.json or safetensors file, so it does not look like a "
                "checkpoint; --overwrite replaces only a checkpoint folder or an empty one (not replaced)"
            )
    parent = real_destination.parent
    if not parent.is_dir():
        raise OfflineConversionError(f"{destination}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OfflineConversionError(f"{destination}: parent folder {parent} is not writable")
