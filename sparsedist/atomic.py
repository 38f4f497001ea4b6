"""Durable file writes shared by checkpoints and dataset preparation."""

from __future__ import annotations

import os
import shutil
import tempfile


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


def replace_directory(staging: str, directory: str) -> None:
    """Rename the finished sibling `staging` to `directory`, replacing a directory already there.

    Readers never see a partly written directory: only the renames remain after `staging` is complete
    (between them `directory` is briefly absent, and a crash there leaves the old one in a hidden sibling).
    """
    parent = os.path.dirname(os.path.abspath(directory))
    if os.path.exists(directory):
        retired = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=parent)
        os.rename(directory, os.path.join(retired, "old"))
        os.rename(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, directory)
    fsync_path(parent)
