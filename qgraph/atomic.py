"""Atomic folder writes: build a folder beside its destination, then swap it into place.

Linux cannot rename a folder over a non-empty one, so the swap is: take the destination's lock, write
everything into a temporary sibling and fsync it, then exchange the two names in one step
(``renameat2(RENAME_EXCHANGE)``), fsync the parent and delete the old folder, now under the temporary name.
At every instant the destination is either the whole old folder or the whole new one, and stale files of the
old folder never survive a rewrite. Where the file system cannot exchange names, the fallback renames the old
folder aside (``.<name>.old``) and the new one into place; `resolve` reads the aside copy if a crash fell
between those two renames, and the next write puts it back. A second writer to the same destination fails
at once with a clear error instead of racing.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qgraph.errors import QGraphError


class WriteError(QGraphError):
    """An output folder cannot be written (not a folder, not writable, or another writer holds it)."""


def check_writable_folder(path: str | Path) -> Path:
    """Fail early (before any work) when ``path`` cannot become an output folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise WriteError(f"--out {p} exists and is not a folder: give a folder path (it is created if missing)")
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise WriteError(f"cannot write {p}: {probe} is not a folder")
    try:  # os.access says yes to root everywhere: try it
        shutil.rmtree(tempfile.mkdtemp(prefix=".qgraph-probe-", dir=probe))
    except OSError as e:
        raise WriteError(f"cannot write {p}: {probe} is not writable ({e.strerror})") from None
    return p


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(dest: Path) -> Iterator[None]:
    """Exclusive lock on ``dest`` for one writer (``.<name>.lock`` beside it, removed afterwards)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriteError(f"another process is writing {dest} right now; wait for it to finish or choose "
                             f"another --out") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the kernel or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def resolve(dest: str | Path) -> Path:
    """``dest``, or its aside copy when a fallback swap was cut between its two renames."""
    dest = Path(dest)
    aside = dest.parent / f".{dest.name}.old"
    return aside if not dest.exists() and aside.is_dir() else dest


def _recover(dest: Path) -> None:
    """Put back an old folder left aside by a swap that crashed between its two renames."""
    aside = dest.parent / f".{dest.name}.old"
    if aside.exists():
        if dest.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, dest)


@contextlib.contextmanager
def atomic_folder(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on normal exit it replaces ``dest`` whole, on error it is removed."""
    dest = Path(dest)
    check_writable_folder(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create {dest.parent}: {e.strerror}") from None
    with folder_lock(dest):
        _recover(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
        try:
            yield tmp
            _fsync_tree(tmp)
            if not dest.exists():
                os.rename(tmp, dest)
            elif not _exchange(tmp, dest):
                aside = dest.parent / f".{dest.name}.old"
                os.rename(dest, aside)
                os.rename(tmp, dest)
                shutil.rmtree(aside, ignore_errors=True)
            _fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
