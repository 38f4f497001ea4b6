"""The run directory: what a run writes where, and whether a launch may start, resume or replace it.

    <run_dir>/config.yaml        resolved config (run.run_dir absolute), rewritten at every launch
             metrics.jsonl       step and epoch records (rank 0), the run's history
             tensorboard/        rank 0's event files
             epoch_NNNNN/        checkpoints registered with Ray Train (it keeps run.checkpoints_to_keep)
             best/               the checkpoint with the best validation accuracy so far
             checkpoint_manager_snapshot.json   Ray Train's record of the registered checkpoints
             pids/rank<R>.pid    "<host> <pid>" of every worker of the current attempt
             summary.json        written when the run completes

Ray Train's storage path is the run directory's parent and its run name the directory's name, so Ray's
files and ours share one directory, and relaunching with the same run_dir is how Ray resumes.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import yaml

from sparsedist.config import Config, apply_overrides, validate

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
BEST_DIR = "best"
PIDS_DIR = "pids"
SUMMARY_FILE = "summary.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# Fields a resumed run may change: where things live, how many resources, how often it logs or keeps
# checkpoints. Everything else shapes the trajectory, so changing it on resume is refused.
RESUME_SAFE_FIELDS = (
    "run.name", "run.run_dir", "run.max_failures", "run.checkpoints_to_keep",
    "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker",
    "data.root", "data.source", "data.download", "data.loader_workers",
    "eval.batch_size", "train.log_every_steps",
    "run.init_from",  # read only by a run without a checkpoint of its own
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
    return os.path.isfile(os.path.join(run_dir, RAY_SNAPSHOT_FILE))


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
    config_path = os.path.join(run_dir, CONFIG_FILE)
    exists = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    is_run = os.path.isfile(config_path)
    if exists and not is_run:
        raise RunDirError(f"{run_dir} is not empty and holds no {CONFIG_FILE}: not a sparsedist run directory; "
                          "choose another --run-dir")
    if resume:
        if not is_run:
            raise RunDirError(f"nothing to resume: {run_dir} holds no run")
        if os.path.isfile(os.path.join(run_dir, SUMMARY_FILE)):
            raise RunDirError(f"the run in {run_dir} already completed ({SUMMARY_FILE} exists); "
                              "use --overwrite to train it again")
        with open(config_path, encoding="utf-8") as handle:
            stored = yaml.safe_load(handle)
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
    if overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, CONFIG_FILE), "w", encoding="utf-8") as handle:
        handle.write(cfg.to_yaml())
    return cfg
