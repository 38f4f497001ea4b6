"""Atomic checkpoints that are never loaded silently when damaged.

Layout: <directory>/state.pt and <directory>/COMPLETE, the marker written last, holding the size and
SHA-256 of state.pt. Saving writes to a temporary sibling directory, fsyncs, then renames it into
place, so a crash leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from sparsedist.atomic import fsync_path, replace_directory

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or damaged."""


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(state: dict[str, Any], directory: str) -> str:
    """Write `state` (plain data and tensors only) to `directory` atomically; replaces an existing one."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        _write_synced(os.path.join(staging, STATE_FILE), payload)
        marker = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        _write_synced(os.path.join(staging, MARKER_FILE), json.dumps(marker).encode())
        fsync_path(staging)
        replace_directory(staging, directory)  # a rerun of the same epoch re-saves under the same name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verifying its marker; raise CheckpointError otherwise."""
    state_path = os.path.join(directory, STATE_FILE)
    marker_path = os.path.join(directory, MARKER_FILE)
    if not os.path.isfile(marker_path):
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {MARKER_FILE} marker); refusing to load it")
    try:
        with open(marker_path, encoding="utf-8") as handle:
            marker = json.load(handle)
        with open(state_path, "rb") as handle:
            payload = handle.read()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {directory} is unreadable: {error}") from None
    if len(payload) != marker.get("size") or hashlib.sha256(payload).hexdigest() != marker.get("sha256"):
        raise CheckpointError(f"checkpoint {directory} is damaged: {STATE_FILE} does not match its checksum")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}"


def latest_checkpoint(root: str) -> str | None:
    """The newest complete `epoch_*` checkpoint directory under root (damaged ones raise on load, not here)."""
    if not os.path.isdir(root):
        return None
    names = sorted(n for n in os.listdir(root) if n.startswith("epoch_") and os.path.isfile(os.path.join(root, n, MARKER_FILE)))
    return os.path.join(root, names[-1]) if names else None
