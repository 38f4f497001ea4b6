"""Atomic checkpoints that are never loaded silently when damaged.

Layout: <directory>/state.pt and <directory>/COMPLETE, the marker written last, holding the size and
SHA-256 of state.pt. Saving writes to a temporary sibling directory, fsyncs, then renames it into
place, so a crash leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from typing import Any, Iterator

import torch

from sparsedist import storage
from sparsedist.atomic import fsync_path, remove_stale_siblings, replace_directory, staging_sibling

log = logging.getLogger("sparsedist")

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE"
REPLACED_WHILE_READING_RETRIES = 5


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or damaged."""


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(state: dict[str, Any], directory: str, *copies: str) -> str:
    """Write `state` (plain data and tensors only) to `directory`, and to each of `copies`, atomically;
    replaces an existing one. The state is serialized and hashed once however many copies it gets."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    marker = json.dumps({"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    for target in (directory, *copies):
        _write_checkpoint(payload, marker, os.path.abspath(target))
    return os.path.abspath(directory)


def _write_checkpoint(payload: bytes, marker: bytes, directory: str) -> None:
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    remove_stale_siblings(directory)
    staging = staging_sibling(directory)
    try:
        _write_synced(os.path.join(staging, STATE_FILE), payload)
        _write_synced(os.path.join(staging, MARKER_FILE), marker)
        fsync_path(staging)
        replace_directory(staging, directory)  # a rerun of the same epoch re-saves under the same name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_verified(directory: str) -> bytes:
    """state.pt's bytes after checking them against the marker; CheckpointError otherwise."""
    if not os.path.isfile(os.path.join(directory, MARKER_FILE)):
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {MARKER_FILE} marker); refusing to load it")
    try:
        with open(os.path.join(directory, MARKER_FILE), encoding="utf-8") as handle:
            marker = json.load(handle)
        with open(os.path.join(directory, STATE_FILE), "rb") as handle:
            payload = handle.read()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {directory} is unreadable: {error}") from None
    if len(payload) != marker.get("size") or hashlib.sha256(payload).hexdigest() != marker.get("sha256"):
        raise CheckpointError(f"checkpoint {directory} is damaged: {STATE_FILE} does not match its checksum")
    return payload


def _identity(directory: str) -> tuple[int, int] | None:
    """Which directory is at the name: a replacement has another inode, or (inode numbers are reused once
    the old one is deleted) a newer change time, since a rename updates it."""
    try:
        status = os.stat(directory)
    except OSError:
        return None
    return status.st_ino, status.st_ctime_ns


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verifying its marker; raise CheckpointError otherwise.

    A checkpoint replaced while it is read (best/ during training) can pair one version's marker with the
    other's state: such a read is retried, and only a mismatch within one directory counts as damage.
    """
    for _ in range(REPLACED_WHILE_READING_RETRIES):
        before = _identity(directory)
        try:
            payload = read_verified(directory)
            break
        except CheckpointError:
            if before is not None and _identity(directory) == before:
                raise
    else:
        payload = read_verified(directory)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
        # The checksum matched, so this is not damage in transit: the file holds something other than
        # plain tensors and data (a planted pickle, another program's file). Nothing in it is executed.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {directory} holds a payload that safe (weights-only) loading refuses: "
                              f"{first_line}") from None


def checkpoint_name(epoch: int, batches: int | None = None) -> str:
    """epoch_00003 after (0-based) epoch 3; epoch_00003_b0000057 mid-epoch, 57 batches into the next one.
    Names sort in training order (a first-epoch mid-epoch checkpoint, epoch -1, sorts before epoch_00000)."""
    return f"epoch_{epoch:05d}" + (f"_b{batches:07d}" if batches is not None else "")


def state_checkpoint_name(state: dict[str, Any]) -> str:
    """The checkpoint name of a loaded state: its epoch, and its batches when it was written mid-epoch."""
    return checkpoint_name(state["epoch"], (state.get("partial_epoch") or {}).get("batches"))


def complete_checkpoints(root: str, mid_epoch: bool = True) -> Iterator[str]:
    """The complete `epoch_*` checkpoint directories under root, a path or a storage URI, newest first, found
    by listing (damaged ones raise on load, not here); without `mid_epoch`, epoch checkpoints only."""
    if not storage.is_uri(root) and not os.path.isdir(root):
        return
    names = [name for name in storage.list_dir(root) if name.startswith("epoch_") and (mid_epoch or "_b" not in name)]
    yield from (storage.join(root, name) for name in reversed(names)
                if storage.is_file(storage.join(root, name, MARKER_FILE)))


def latest_checkpoint(root: str) -> str | None:
    """The newest complete epoch checkpoint directory under root (what `eval` and `export` read), or None;
    mid-epoch checkpoints are for resuming."""
    return next(complete_checkpoints(root, mid_epoch=False), None)


def newer_of(state: dict[str, Any] | None, root: str) -> dict[str, Any] | None:
    """`state` (a loaded checkpoint, or None), or the newest epoch checkpoint under `root` (a path or a storage
    URI) that is newer and verifies.

    Ray Train registers a checkpoint a moment after its upload, and resumes from the registered one: a host lost
    in between would cost every epoch since. A newer checkpoint that does not verify (an upload cut short) is
    passed over, with a warning, for the next older one.
    """
    for candidate in complete_checkpoints(root):
        if state is not None and storage.parent_and_name(candidate)[1] <= state_checkpoint_name(state):
            break
        try:
            with storage.local_view(candidate) as directory:
                newer = load_checkpoint(directory)
        except (CheckpointError, OSError) as error:
            log.warning(f"  {candidate} is not a complete checkpoint ({error}); passed over")
            continue
        log.info(f"  resuming from {candidate}, newer than the registered checkpoint")
        return newer
    return state
