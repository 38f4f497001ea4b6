"""The run directory: what a run writes where, and whether a launch may start, resume or replace it.

The run directory is a local (or shared) path or an object-store URI (see `sparsedist.storage`):

    <run_dir>/config.yaml        resolved config (run.run_dir absolute), rewritten at every launch
             metrics.jsonl       step and epoch records (rank 0), the run's history
             tensorboard/        rank 0's event files
             epoch_NNNNN/        checkpoints registered with Ray Train (it keeps run.checkpoints_to_keep)
             best/               the checkpoint with the best validation accuracy so far
             checkpoint_manager_snapshot.json   Ray Train's record of the registered checkpoints
             pids/rank<R>.pid    "<host> <pid> <Ray node id>" of every worker of the current attempt
             attempts.jsonl      one line per attempt (rank 0, at its start): start epoch, time, versions,
                                 commit, device, world size, nodes: restarts and provenance
             failure.json        why the workers ended the run on a failure a retry would replay
             summary.json        written when the run completes

Ray Train's storage path is the run directory's parent and its run name the directory's name, so Ray's
files and ours share one directory, and relaunching with the same run_dir is how Ray resumes.
Rank 0 writes its files in a node-local mirror (`RunMirror`) and publishes them to the run directory at
every checkpoint, before Ray registers the checkpoint: the run directory is complete up to its newest
checkpoint, on any storage. pids/ stays in the mirror (it names processes of that node).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import yaml

from sparsedist import storage
from sparsedist.config import Config, apply_overrides, validate
from sparsedist.train.checkpoint import MARKER_FILE, CheckpointError, read_verified

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
BEST_DIR = "best"
PIDS_DIR = "pids"
SUMMARY_FILE = "summary.json"
ATTEMPTS_FILE = "attempts.jsonl"
FAILURE_FILE = "failure.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# Fields a resumed run may change: where things live, how many resources, how often it logs or keeps
# checkpoints. Everything else shapes the trajectory, so changing it on resume is refused.
RESUME_SAFE_FIELDS = (
    "run.name", "run.run_dir", "run.max_failures", "run.max_preemption_failures", "run.checkpoints_to_keep", "run.verbose",
    "run.preemption_check_steps",
    "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker",
    "data.root", "data.source", "data.download", "data.loader_workers",
    "eval.batch_size", "train.log_every_steps",
    "run.init_from",  # read only by a run without a checkpoint of its own
    "tracking.backend", "tracking.uri", "tracking.experiment",
)


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, not resumable, or resumed with another config)."""


def flat_fields(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def incompatible_fields(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """'path: stored -> requested' for every differing field that a resume may not change."""
    old, new = flat_fields(stored), flat_fields(requested)
    return [
        f"{path}: {old.get(path, '<absent>')!r} -> {new.get(path, '<absent>')!r}"
        for path in sorted(old.keys() | new.keys())
        if path not in RESUME_SAFE_FIELDS and old.get(path) != new.get(path)
    ]


def with_run_dir(cfg: Config) -> Config:
    """The config with run.run_dir set to its absolute resolved path (workers get no other way to find it)."""
    return validate(apply_overrides(cfg.to_dict(), {"run.run_dir": cfg.run.resolved_run_dir()}))


def has_registered_checkpoint(run_dir: str) -> bool:
    return storage.is_file(storage.join(run_dir, RAY_SNAPSHOT_FILE))


def check_run_dir(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Config:
    """Raise RunDirError unless the run directory may be used as asked; returns the resolved config.

    New directory: start. Existing run: refused unless `resume` (same config up to RESUME_SAFE_FIELDS,
    not yet complete) or `overwrite` (allowed only for a directory holding a sparsedist config.yaml).
    Writes nothing.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    cfg = with_run_dir(cfg)
    run_dir = cfg.run.run_dir
    config_path = storage.join(run_dir, CONFIG_FILE)
    is_run = storage.is_file(config_path)
    exists = is_run or storage.is_nonempty_dir(run_dir)
    if exists and not is_run:
        raise RunDirError(f"{run_dir} is not empty and holds no {CONFIG_FILE}: not a sparsedist run directory; "
                          "choose another --run-dir")
    if resume:
        if not is_run:
            raise RunDirError(f"nothing to resume: {run_dir} holds no run")
        if storage.is_file(storage.join(run_dir, SUMMARY_FILE)):
            raise RunDirError(f"the run in {run_dir} already completed ({SUMMARY_FILE} exists); "
                              "use --overwrite to train it again")
        stored = yaml.safe_load(storage.read_bytes(config_path))
        differences = incompatible_fields(stored, cfg.to_dict())
        if differences:
            raise RunDirError(f"cannot resume {run_dir}: the config differs in fields that change training:\n  "
                              + "\n  ".join(differences) + "\n(start a new run, or --overwrite this one)")
    elif exists and not overwrite:
        state = "with a registered checkpoint" if has_registered_checkpoint(run_dir) else "without checkpoints"
        raise RunDirError(f"{run_dir} already holds a run ({state}); pass --resume to continue it or "
                          "--overwrite to delete it and start again")
    return cfg


def prepare_run_dir(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Config:
    """`check_run_dir`, then (overwrite: delete the old run) write config.yaml; returns the resolved config."""
    cfg = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    run_dir = cfg.run.run_dir
    if overwrite:
        storage.delete_dir(run_dir)
    storage.write_bytes(storage.join(run_dir, CONFIG_FILE), cfg.to_yaml().encode())
    storage.delete_file(storage.join(run_dir, FAILURE_FILE))  # a resumed run gets a new chance
    return cfg


def record_failure(run_dir: str, message: str) -> None:
    storage.write_bytes(storage.join(run_dir, FAILURE_FILE), (json.dumps({"error": message}) + "\n").encode())


def recorded_failure(run_dir: str) -> str | None:
    """The message `record_failure` left in the run directory, if any."""
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, FAILURE_FILE)))["error"]
    except FileNotFoundError:
        return None


class RunMirror:
    """Rank 0's node-local copy of the files it writes (metrics, TensorBoard, best/, attempts), published
    to the run directory with `publish`. For a local run directory the mirror is the directory itself."""

    # config.yaml is not among them: the driver writes it to the run directory itself.
    PUBLISHED = (METRICS_FILE, TENSORBOARD_DIR, BEST_DIR, ATTEMPTS_FILE)

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.local = storage.working_dir(run_dir, "runs")
        self._published: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) last uploaded

    def path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def restore(self) -> None:
        """Start from the run directory's published files (a restarted attempt may land on another node,
        and a stale mirror of an earlier attempt on this node must not leak in). A best/ that an
        interrupted publish left incomplete is dropped, here and in the run directory."""
        if not storage.is_uri(self.run_dir):
            return
        for name in self.PUBLISHED:
            if os.path.isdir(self.path(name)):
                shutil.rmtree(self.path(name))
            elif os.path.exists(self.path(name)):
                os.remove(self.path(name))
            storage.download(storage.join(self.run_dir, name), self.path(name))
        if os.path.isdir(self.path(BEST_DIR)):
            try:
                read_verified(self.path(BEST_DIR))
            except CheckpointError:
                shutil.rmtree(self.path(BEST_DIR))
                storage.delete_dir(storage.join(self.run_dir, BEST_DIR))
        self._published = {relative: self._stamp(relative) for relative in self._files()}  # all there already

    def _files(self) -> list[str]:
        """The mirror's published files as relative paths, each checkpoint marker after its state file."""
        files = []
        for name in self.PUBLISHED:
            if os.path.isfile(self.path(name)):
                files.append(name)
            elif os.path.isdir(self.path(name)):
                files += sorted(os.path.relpath(os.path.join(root, file), self.local)
                                for root, _, names in os.walk(self.path(name)) for file in names)
        return sorted(files, key=lambda relative: os.path.basename(relative) == MARKER_FILE)  # stable: markers last

    def publish(self) -> int:
        """Upload the files changed since the last publish; returns the bytes uploaded (0 when local).

        A checkpoint's marker is removed first and uploaded last, so an interrupted publish leaves best/
        incomplete (refused, and dropped by the next attempt's `restore`), never a mismatched pair.
        """
        if not storage.is_uri(self.run_dir):
            return 0
        changed = [(relative, self._stamp(relative)) for relative in self._files()]
        changed = [(relative, stamp) for relative, stamp in changed if self._published.get(relative) != stamp]
        for relative, _ in changed:
            if os.path.basename(relative) == MARKER_FILE:
                storage.delete_file(self.location(relative))
        copied = 0
        for relative, stamp in changed:
            copied += storage.upload(self.path(relative), self.location(relative))
            self._published[relative] = stamp
        return copied

    def _stamp(self, relative: str) -> tuple[int, int]:
        status = os.stat(self.path(relative))
        return status.st_size, status.st_mtime_ns

    def location(self, relative: str) -> str:
        return storage.join(self.run_dir, *relative.split(os.sep))
