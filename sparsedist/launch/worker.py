"""The Ray Train worker: one DDP replica running the core loop on its FFCV shard.

Every rank: validate the config, restore the latest registered checkpoint if Ray gives one, build its
loaders, train, and call `ray.train.report` once per epoch (a barrier: every rank, same count).
Rank 0 alone writes: metrics.jsonl, TensorBoard, checkpoints, best/.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

import ray.train
import ray.train.torch
import torch

from sparsedist.config import Config, validate
from sparsedist.data import build_loaders
from sparsedist.rundir import BEST_DIR, METRICS_FILE, PIDS_DIR, TENSORBOARD_DIR
from sparsedist.launch.summary import summarize, summary_metrics
from sparsedist.logging import JsonLinesSink, TensorBoardSink, flatten_epoch, read_jsonl, rewind_jsonl
from sparsedist.train.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from sparsedist.train.loop import EpochEnd, train


def record_pid(run_dir: str, rank: int) -> None:
    """pids/rank<R>.pid = "<host> <pid>": which process is which rank in the current attempt (operators,
    py-spy, and the fault-tolerance test that kills one)."""
    directory = os.path.join(run_dir, PIDS_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.pid"), "w", encoding="utf-8") as handle:
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")


def restored_state(device: torch.device) -> dict[str, Any] | None:
    """The latest checkpoint Ray registered for this run (after a restart or a relaunch), else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        # The epoch and step come from the checkpoint's contents: registration lags the saves on disk.
        return load_checkpoint(directory, map_location=device)


def should_checkpoint(cfg: Config, epoch: int) -> bool:
    return (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch == cfg.train.epochs - 1


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; `config` is `Config.to_dict()` with run.run_dir absolute."""
    cfg = validate(config)
    run_dir = cfg.run.run_dir
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    record_pid(run_dir, rank)

    resume_state = restored_state(device)
    if resume_state is None and cfg.run.init_from is not None:
        # A new run continuing another run's state under this config (PBT's exploit): loaded on the CPU,
        # the loop moves it onto the model's device.
        resume_state = load_checkpoint(cfg.run.init_from)
    last_done_epoch = -1 if resume_state is None else resume_state["epoch"]
    loaders = build_loaders(cfg, rank=rank, world_size=world_size, device=device, epoch=last_done_epoch + 1)

    sinks, tensorboard = [], None
    if rank == 0:
        metrics_path = os.path.join(run_dir, METRICS_FILE)
        # Records past the restored checkpoint belong to an attempt whose work is about to be redone.
        rewind_jsonl(metrics_path, last_done_epoch)
        tensorboard = TensorBoardSink(os.path.join(run_dir, TENSORBOARD_DIR),
                                      purge_step=None if resume_state is None else resume_state["step"] + 1)
        sinks = [JsonLinesSink(metrics_path), tensorboard]

    def on_epoch_end(end: EpochEnd) -> None:
        with tempfile.TemporaryDirectory(prefix="sparsedist-ckpt-") as staging:
            checkpoint, name = None, checkpoint_name(end.epoch)
            if rank == 0 and (should_checkpoint(cfg, end.epoch) or end.is_best):
                state = end.state()
                if end.is_best:
                    save_checkpoint(state, os.path.join(run_dir, BEST_DIR))
                if should_checkpoint(cfg, end.epoch):
                    # Ray copies it into the run directory under the same, epoch-derived name: a restarted
                    # attempt that redoes this epoch re-registers the same directory.
                    checkpoint = ray.train.Checkpoint.from_directory(save_checkpoint(state, os.path.join(staging, name)))
            ray.train.report(flatten_epoch(end.record), checkpoint=checkpoint,
                             checkpoint_dir_name=name if checkpoint is not None else None)

    try:
        train(cfg, loaders, device=device, sinks=sinks, on_epoch_end=on_epoch_end, resume_state=resume_state)
        if tensorboard is not None:
            summary = summarize(read_jsonl(os.path.join(run_dir, METRICS_FILE)),
                                select_keep_ratio=cfg.eval.select_keep_ratio)
            tensorboard.write_hparams(cfg.to_dict(), summary_metrics(summary), step=summary["steps"])
    finally:
        for sink in sinks:
            sink.close()
