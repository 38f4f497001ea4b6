"""Durable file writes shared by checkpoints and dataset preparation."""

from __future__ import annotations

import os


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
