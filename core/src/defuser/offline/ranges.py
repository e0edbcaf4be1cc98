"""Copying a byte range of one open file to a position in another without decoding it: the
per-expert slices of a zero-copy layout (and every tensor copied unchanged) are contiguous
ranges of the source shard, so they need no tensor, no dtype and no Python-level buffer.

The kernel does the copy where it can: ``os.copy_file_range`` (Linux, no user-space copy; a
reflink on file systems that share blocks), else ``os.sendfile`` (file to file since Linux
2.6.33), else reads and writes through two reusable buffers, the next chunk read by a thread
while the current one is written.  A method the system or the file-system pair refuses
(``ENOSYS``, ``EXDEV``, ``EINVAL``, ...) is left for the next one for the rest of the process;
any other error, and a source that ends early, raises."""

from __future__ import annotations

import concurrent.futures
import errno
import os

__all__ = ["CHUNK_BYTES", "copy_range", "methods_available"]

CHUNK_BYTES = 16 << 20
# errno values meaning "this method cannot copy between these files": try the next method.
_UNSUPPORTED = {
    errno.ENOSYS,
    errno.EXDEV,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EPERM,
    errno.EBADF,
    errno.ENOTSOCK,  # macOS: sendfile writes to sockets only
}
# Methods found unusable in this process; looked up again in os at each call (tests remove them).
_refused: set[str] = set()
_buffers: dict[int, tuple[bytearray, bytearray]] = {}  # pid -> the two chunk buffers (a forked job makes its own)


class SourceEndedError(OSError):
    """The source file holds fewer bytes than the range asks for (truncated meanwhile?)."""


def methods_available() -> list[str]:
    """The kernel copy methods this process will try, in order (the buffered copy always follows)."""
    return [name for name in ("copy_file_range", "sendfile") if hasattr(os, name) and name not in _refused]


def _with_copy_file_range(source: int, target: int, source_offset: int, target_offset: int, count: int) -> int:
    done = 0
    while done < count:
        copied = os.copy_file_range(source, target, count - done, source_offset + done, target_offset + done)
        if copied == 0:
            break
        done += copied
    return done


def _with_sendfile(source: int, target: int, source_offset: int, target_offset: int, count: int) -> int:
    os.lseek(target, target_offset, os.SEEK_SET)  # sendfile writes at the target's position
    done = 0
    while done < count:
        sent = os.sendfile(target, source, source_offset + done, count - done)
        if sent == 0:
            break
        done += sent
    return done


def _read_into(source: int, buffer: bytearray, offset: int, count: int) -> int:
    """Fill ``buffer[:count]`` from ``offset``; fewer bytes only at the end of the file."""
    view, done = memoryview(buffer), 0
    while done < count:
        if hasattr(os, "preadv"):
            got = os.preadv(source, [view[done:count]], offset + done)
        else:  # no preadv (macOS before 11, Windows): one copy more
            if hasattr(os, "pread"):
                data = os.pread(source, count - done, offset + done)
            else:
                os.lseek(source, offset + done, os.SEEK_SET)
                data = os.read(source, count - done)
            view[done : done + len(data)] = data
            got = len(data)
        if got == 0:
            break
        done += got
    return done


def _write_all(target: int, view: memoryview, offset: int) -> None:
    while len(view):
        if hasattr(os, "pwrite"):
            written = os.pwrite(target, view, offset)
        else:  # Windows
            os.lseek(target, offset, os.SEEK_SET)
            written = os.write(target, view)
        view, offset = view[written:], offset + written


def _with_buffers(source: int, target: int, source_offset: int, target_offset: int, count: int) -> int:
    """Read and write through two reusable buffers: chunk k+1 is read while chunk k is written."""
    buffers = _buffers.setdefault(os.getpid(), (bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES)))
    size = min(CHUNK_BYTES, count)
    if count <= CHUNK_BYTES:  # one chunk: no thread
        got = _read_into(source, buffers[0], source_offset, size)
        _write_all(target, memoryview(buffers[0])[:got], target_offset)
        return got
    done, turn = 0, 0
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending: concurrent.futures.Future[int] | None = reader.submit(
            _read_into, source, buffers[0], source_offset, size
        )
        while pending is not None:
            got = pending.result()
            left_after = count - done - got
            pending = None
            if got == min(CHUNK_BYTES, count - done) and left_after > 0:
                offset = source_offset + done + got
                pending = reader.submit(_read_into, source, buffers[1 - turn], offset, min(CHUNK_BYTES, left_after))
            _write_all(target, memoryview(buffers[turn])[:got], target_offset + done)
            done += got
            turn = 1 - turn
    return done


_METHODS = (("copy_file_range", _with_copy_file_range), ("sendfile", _with_sendfile))


def copy_range(source: int, target: int, source_offset: int, target_offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``source_offset`` of the file descriptor ``source`` to
    ``target_offset`` of ``target``.  Raises :class:`SourceEndedError` when the source ends
    first and ``OSError`` for a failed read or write (a full disk: ``ENOSPC``)."""
    if count == 0:
        return
    for name, method in _METHODS:
        if name in _refused or not hasattr(os, name):
            continue
        try:
            done = method(source, target, source_offset, target_offset, count)
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            _refused.add(name)  # the next method copies the whole range again, over anything written
            continue
        if done != count:
            raise SourceEndedError(errno.EIO, f"the source ends after {done} of {count} bytes")
        return
    if _with_buffers(source, target, source_offset, target_offset, count) != count:
        raise SourceEndedError(errno.EIO, f"the source ends before {count} bytes at offset {source_offset}")
