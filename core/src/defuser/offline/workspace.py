"""The temporary folder a conversion writes into, and how it takes the destination's place.

A run works in ``.<DST name>.defuser-XXXX/`` beside the destination.  Before anything else is
written there, the run creates the marker file ``.defuser-temporary`` in it (JSON: the
destination's name, the process id and host) and holds an exclusive ``flock`` on it for as long
as it runs.  The result is written into ``new/`` inside, so the marker never reaches the
destination.  A run that is killed outright (SIGKILL, a power cut) cannot clean up; the next
run into the same parent folder removes every such folder whose marker no process holds any
more, and logs each one.  A folder without the marker is never removed, whatever its name (so
a run killed between ``mkdtemp`` and creating the marker, a window of one system call, leaves
an empty folder that stays).

Replacing an existing destination (``--overwrite``) is one ``renameat2(RENAME_EXCHANGE)`` on
Linux: the destination holds the old folder or the new one at every instant.  Where that call
is missing (other systems, file systems without it) the old folder is first moved into the
temporary folder as ``old/`` and the new one renamed into place; a run killed between those two
renames leaves no destination for that instant, and the next run puts ``old/`` back as the
destination before it removes the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TextIO

try:
    import fcntl
except ImportError:  # Windows: no flock, so no folder can be proven abandoned
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER_NAME", "Workspace", "remove_stale_workspaces"]

logger = logging.getLogger(__name__)

MARKER_NAME = ".defuser-temporary"
_NAME_PART = ".defuser-"
_NEW, _OLD = "new", "old"
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# errno values meaning "this system or file system cannot do it": fall back to plain renames.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)`` through libc; ``False`` when the system or the file
    system lacks it (the caller falls back), ``OSError`` for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(target))


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system cannot."""
    return _renameat2(first, second, _RENAME_EXCHANGE)


def _rename_new(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, which must not exist (``os.rename`` alone would replace
    an empty folder made there meanwhile)."""
    if not _renameat2(source, target, _RENAME_NOREPLACE):
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "appeared during the conversion; not replaced", str(target))
        os.rename(source, target)


def _held(marker: Path) -> bool | None:
    """Whether a live process holds ``marker``'s lock; ``None`` where locks cannot tell."""
    if fcntl is None:
        return None
    try:
        with open(marker) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return None


def remove_stale_workspaces(parent: Path) -> list[Path]:
    """Remove the temporary folders in ``parent`` left by conversions that were killed: named
    ``.<name>.defuser-...``, holding the marker file, and locked by no process.  An ``old/``
    folder inside whose destination is missing (a run killed mid-replacement, without
    ``RENAME_EXCHANGE``) is put back as that destination first.  Logs and returns what it removed."""
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for folder in entries:
        if not (folder.name.startswith(".") and _NAME_PART in folder.name):
            continue
        marker = folder / MARKER_NAME
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
            continue  # not one of ours: never touched
        if _held(marker) is not False:
            continue  # a conversion still running (or no way to know)
        try:
            destination_name = str(json.loads(marker.read_text()).get("destination", ""))
        except (OSError, ValueError, AttributeError):
            destination_name = ""
        old, destination = folder / _OLD, parent / destination_name
        if destination_name and "/" not in destination_name and old.is_dir() and not destination.exists():
            os.rename(old, destination)
            logger.warning("put back %s from %s, left by a conversion killed while replacing it", destination, folder)
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed %s, the temporary folder of a conversion that was killed", folder)
        removed.append(folder)
    return removed


class Workspace:
    """The marked temporary folder of one run (a context manager): the result goes into
    :attr:`folder`, :meth:`install` moves it into place, leaving removes what is left."""

    def __init__(self, parent: Path, destination: Path):
        self.destination = destination
        self.parent = parent
        self.root: Path | None = None
        self._marker: TextIO | None = None

    @property
    def folder(self) -> Path:
        """Where the result is written."""
        assert self.root is not None, "used outside its with block"
        return self.root / _NEW

    def __enter__(self) -> Workspace:
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}{_NAME_PART}", dir=self.parent))
        try:
            # The marker comes first and stays locked: it is what tells a later run the folder is ours.
            self._marker = open(self.root / MARKER_NAME, "w")  # closed by __exit__
            if fcntl is not None:
                try:
                    fcntl.flock(self._marker, fcntl.LOCK_EX)
                except OSError:  # a file system without locks: later runs cannot tell, so leave it
                    logger.debug("%s: no lock on the marker; a killed run's folder stays", self.root)
            record = {"destination": self.destination.name, "pid": os.getpid(), "host": socket.gethostname()}
            self._marker.write(json.dumps(record) + "\n")
            self._marker.flush()
            umask = os.umask(0)
            os.umask(umask)
            self.folder.mkdir(mode=0o777 & ~umask)  # DST gets a plain folder's mode (mkdtemp's is private)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def install(self) -> None:
        """Move the finished result to the destination; an existing destination (allowed by
        the caller) is replaced, atomically where the system can, and named in the log."""
        destination, new = self.destination, self.folder
        if not (destination.exists() or destination.is_symlink()):
            _rename_new(new, destination)
            return
        if not exchange(new, destination):
            assert self.root is not None, "used outside its with block"
            old = self.root / _OLD
            os.rename(destination, old)
            os.rename(new, destination)  # the window: until here there is no destination (__exit__ restores)
        logger.warning("replaced %s; its previous content is removed", destination)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.root is not None:
            old, destination = self.root / _OLD, self.destination
            if old.is_dir() and not (destination.exists() or destination.is_symlink()):
                os.rename(old, destination)  # stopped between the two renames: the old one goes back
            shutil.rmtree(self.root, ignore_errors=True)
        if self._marker is not None:
            with contextlib.suppress(OSError):
                self._marker.close()  # releases the lock, after the folder is gone
