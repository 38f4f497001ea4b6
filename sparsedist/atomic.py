"""Durable file writes shared by checkpoints and dataset preparation."""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import shutil
import tempfile

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two existing paths atomically


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory fsync makes a rename inside it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: str | os.PathLike, content: bytes) -> None:
    """Replace `path` with `content` so that readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    staging = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(staging, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


@functools.cache
def _renameat2():
    """libc's renameat2, or None where the C library has none."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(first: str, second: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), first)


def staging_sibling(directory: str) -> str:
    """A fresh hidden sibling of `directory` to build its next version in (see `remove_stale_siblings`)."""
    return tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=os.path.dirname(os.path.abspath(directory)))


def remove_stale_siblings(directory: str) -> None:
    """Delete the hidden siblings a crashed save or replace of `directory` left behind. Only while
    `directory` itself exists: after a crash between the two renames of the fallback in
    `replace_directory`, the retired sibling holds the only copy."""
    if os.path.isdir(directory):
        for stale in glob.glob(os.path.join(os.path.dirname(os.path.abspath(directory)),
                                            f".{glob.escape(os.path.basename(directory))}.*")):
            shutil.rmtree(stale, ignore_errors=True)


def replace_directory(staging: str, directory: str) -> None:
    """Rename the finished sibling `staging` to `directory`, replacing a directory already there.

    Readers never see a partly written directory, nor a moment without one: the two are swapped in one
    atomic exchange and the old version, now at the staging name, is deleted. Where the filesystem
    cannot exchange, two renames leave `directory` briefly absent (a crash there leaves the old one in a
    hidden sibling).
    """
    parent = os.path.dirname(os.path.abspath(directory))
    if os.path.exists(directory):
        if _exchange(staging, directory):
            shutil.rmtree(staging, ignore_errors=True)
        else:
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=parent)
            os.rename(directory, os.path.join(retired, "old"))
            os.rename(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, directory)
    fsync_path(parent)
