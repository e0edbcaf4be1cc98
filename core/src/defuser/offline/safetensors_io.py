"""The safetensors format, read and written without ``safetensors.safe_open``: header parsing
with the format's own checks, reading one tensor into one buffer with plain file reads, and a
streaming writer that emits the header first and each tensor's bytes as soon as it exists."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from defuser.offline.ranges import SourceEndedError, copy_range

__all__ = [
    "DTYPE_SIZES",
    "OfflineConversionError",
    "OutputTensor",
    "ShardWriter",
    "TensorEntry",
    "byte_view",
    "read_safetensors_header",
    "read_tensor",
    "same_width_int",
    "written_to",
]

# Bytes of one element per safetensors dtype.  Tensors of other dtypes (sub-byte formats) are
# copied as raw bytes but cannot be split.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Fused tensors are sliced as integers of the same width: exact for every dtype, NaNs included.
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_HEADER = 100 << 20


# Defined in the module every other one imports, so that each of them can raise it.
class OfflineConversionError(ValueError):
    """The checkpoint cannot be converted as asked; the message names the file, key or folder."""


class _Shaped:
    """``numel`` for the tensor records below, which all carry a ``shape``."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorEntry(_Shaped):
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in the file
    nbytes: int


@dataclass(frozen=True)
class OutputTensor(_Shaped):
    """One tensor the conversion writes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def same_width_int(dtype: str) -> torch.dtype:
    """The integer dtype whose elements are as wide as those of the safetensors ``dtype``."""
    return _SAME_WIDTH_INT[DTYPE_SIZES[dtype]]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """The tensors (in file order) and ``__metadata__`` of the safetensors file ``path``, with
    the header checked the way safetensors checks it (sizes, offsets without holes or overlaps)."""
    path = Path(path)

    def invalid(reason: str) -> OfflineConversionError:
        return OfflineConversionError(f"{path}: not a valid safetensors file ({reason})")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise invalid("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, _MAX_HEADER):
            raise invalid(f"header length {length} exceeds the file")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise invalid(f"header is not JSON: {error}") from None
        except RecursionError:
            raise invalid("header is JSON nested too deep to read") from None
        except ValueError as error:  # an integer beyond sys.get_int_max_str_digits()
            raise invalid(f"header is unreadable JSON: {str(error).split(';')[0]}") from None
    if not isinstance(header, dict):
        raise invalid("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise invalid("__metadata__ is not a map of strings")
    data_start, data_size = 8 + length, size - 8 - length
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise invalid(f"tensor {name!r} lacks dtype, shape or data_offsets") from None
        if not isinstance(dtype, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise invalid(f"tensor {name!r} has a bad dtype or shape")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise invalid(f"tensor {name!r} has data offsets {[begin, end]} outside the data")
        entry = TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
        if dtype in DTYPE_SIZES and entry.numel * DTYPE_SIZES[dtype] != entry.nbytes:
            raise invalid(f"tensor {name!r}: {dtype} {list(shape)} does not fill {entry.nbytes} bytes")
        entries.append(entry)
    entries.sort(key=lambda e: (e.start, e.nbytes))
    position = data_start
    for entry in entries:
        if entry.start != position:
            raise invalid(f"tensor {entry.name!r} does not start where the previous one ends")
        position += entry.nbytes
    if position != size:
        raise invalid("the tensors do not cover the data exactly")
    return {entry.name: entry for entry in entries}, metadata


@contextlib.contextmanager
def written_to(path: Path) -> Iterator[None]:
    """An ``OSError`` while writing ``path`` (a full disk: ``[Errno 28]``) becomes an
    :class:`OfflineConversionError` that names the file."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise OfflineConversionError(f"{path}: cannot write ({reason}, errno {error.errno})") from error


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory, without a copy (no numpy needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_exact(handle: BinaryIO, start: int, view: memoryview) -> None:
    handle.seek(start)
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            raise OfflineConversionError(f"{handle.name}: file ends early (truncated while reading?)")
        done += count


def read_tensor(handle: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """``entry``'s elements as a tensor of same-width integers in its shape, read from the open
    file ``handle`` into one buffer (a memory map would keep every page it touched resident)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    _read_exact(handle, entry.start, byte_view(buffer))
    return buffer.view(same_width_int(entry.dtype)).reshape(entry.shape)


class ShardWriter:
    """Writes one safetensors file as a stream: the header from the planned tensors, then each
    tensor's bytes in the planned order (``safetensors.torch.save_file`` needs them all in memory)."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {
                "dtype": tensor.dtype,
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        self.path = path
        self._pending = list(reversed(tensors))
        with written_to(path):
            self._handle = open(path, "wb")  # closed by close() or abort()
            self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._position = 8 + len(raw)  # where the next tensor's bytes go
        self._pending_range: tuple[BinaryIO, int, int] | None = None  # (source, start, bytes) not yet copied

    def _next(self, name: str, nbytes: int) -> None:
        expected = self._pending.pop() if self._pending else None
        if expected is None or expected.name != name or expected.nbytes != nbytes:
            planned = f"{expected.name!r} ({expected.nbytes} bytes)" if expected else "nothing"
            raise OfflineConversionError(
                f"{self.path.name}: wrote {name!r} ({nbytes} bytes) where {planned} was planned"
            )

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor``'s bytes as the planned tensor ``name``; returns the byte count."""
        tensor = tensor.contiguous()
        data = byte_view(tensor)
        self._next(name, len(data))
        self._copy_pending()
        with written_to(self.path):
            self._handle.write(data)
        self._position += len(data)
        return len(data)

    def copy_range(self, name: str, source: BinaryIO, start: int, nbytes: int) -> int:
        """Append ``nbytes`` bytes at ``start`` of the open file ``source`` as the planned
        tensor ``name``, undecoded; returns the byte count.  Ranges that continue one another
        in the same source are copied with one call, when the next one comes or at close."""
        self._next(name, nbytes)
        self._append_range(source, start, nbytes)
        return nbytes

    def copy_ranges(self, name: str, parts: list[tuple[BinaryIO, int, int]]) -> int:
        """Append the planned tensor ``name`` as the concatenation of byte ranges ``(source,
        start, bytes)`` (the per-expert tensors of a fused one, in order); returns the byte count."""
        nbytes = sum(count for _, _, count in parts)
        self._next(name, nbytes)
        for source, start, count in parts:
            self._append_range(source, start, count)
        return nbytes

    def _append_range(self, source: BinaryIO, start: int, nbytes: int) -> None:
        pending = self._pending_range
        if pending is not None and pending[0] is source and pending[1] + pending[2] == start:
            self._pending_range = (source, pending[1], pending[2] + nbytes)
        else:
            self._copy_pending()
            self._pending_range = (source, start, nbytes)

    def _copy_pending(self) -> None:
        if self._pending_range is None:
            return
        source, start, nbytes = self._pending_range
        self._pending_range = None
        with written_to(self.path):
            self._handle.flush()  # what is buffered goes first
            target = self._handle.fileno()
            try:
                copy_range(source.fileno(), target, start, self._position, nbytes)
            except SourceEndedError:
                raise OfflineConversionError(f"{source.name}: file ends early (truncated while reading?)") from None
            self._position += nbytes
            os.lseek(target, self._position, os.SEEK_SET)  # the buffered writes go on after the copy

    def copy(self, entry: TensorEntry, source: BinaryIO, name: str) -> int:
        """Append the bytes of ``entry`` from ``source`` unchanged as ``name``; returns the byte count."""
        return self.copy_range(name, source, entry.start, entry.nbytes)

    def close(self) -> None:
        """Flush to disk; fails when planned tensors were not written."""
        if self._pending:
            raise OfflineConversionError(f"{self.path.name}: {self._pending[-1].name!r} was planned but not written")
        self._copy_pending()
        with written_to(self.path):
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def abort(self) -> None:
        """Close without checks (the folder is about to be removed)."""
        with contextlib.suppress(OSError):  # unflushed bytes on a full disk: the file goes anyway
            self._handle.close()
