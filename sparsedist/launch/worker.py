"""The Ray Train worker: one DDP replica running the core loop on its FFCV shard.

Every rank: validate the config, restore the latest registered checkpoint if Ray gives one, build its
loaders, train, and call `ray.train.report` once per epoch (a barrier: every rank, same count).
Rank 0 alone writes, in its node-local mirror of the run directory (`RunMirror`): metrics.jsonl,
TensorBoard, best/, attempts.jsonl; it publishes them to the run directory before every checkpoint
is registered, and logs a start banner and one line per epoch (what `ray job logs` shows).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist

from sparsedist import storage
from sparsedist.config import Config, ConfigError, validate
from sparsedist.data import build_loaders
from sparsedist.report.summary import summarize, summary_metrics
from sparsedist.logging import (JsonLinesSink, TensorBoardSink, epoch_line, flatten_epoch, read_jsonl,
                                rewind_jsonl)
from sparsedist.provenance import banner, provenance
from sparsedist.rundir import (ATTEMPTS_FILE, BEST_DIR, METRICS_FILE, PIDS_DIR, TENSORBOARD_DIR, RunMirror,
                               record_failure)
from sparsedist.tracking import tracking_sinks
from sparsedist.launch.forwarding import MID_EPOCH_METRIC
from sparsedist.train.checkpoint import (CheckpointError, checkpoint_name, load_checkpoint, newer_of, save_checkpoint,
                                         state_checkpoint_name)
from sparsedist.train.distributed import gather_failures
from sparsedist.train.loop import EpochEnd, MidEpoch, NonFiniteLossError, train

log = logging.getLogger("sparsedist")

class StartError(RuntimeError):
    """A rank could not read the run's start state or its data; every rank raises it together."""


# Failures every rank meets at the same point (the loss is all-reduced; every rank loads the same
# checkpoint and config; a start-up failure on any rank is shared): a restart would replay them, so they end the
# run instead of failing the worker.
DETERMINISTIC_ERRORS = (NonFiniteLossError, CheckpointError, ConfigError, StartError)


def record_pid(directory: str, rank: int, node_id: str) -> None:
    """pids/rank<R>.pid = "<host> <pid> <ray node id>": which process is which rank in the current attempt
    (operators, py-spy, and the tests that kill a worker or check placement)."""
    directory = os.path.join(directory, PIDS_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.pid"), "w", encoding="utf-8") as handle:
        handle.write(f"{socket.gethostname()} {os.getpid()} {node_id}\n")


def restored_state(run_dir: str) -> dict[str, Any] | None:
    """The newest complete checkpoint of this run (after a restart or a relaunch), else None: Ray's registered
    one, or a newer one already complete in the run directory (`newer_of`).

    Loaded on the CPU whatever the device: the RNG states must stay CPU byte tensors, and the loop's
    load_state_dict calls move model and optimizer state onto the model's device.
    """
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # The epoch and step come from the checkpoint's contents, not from Ray's bookkeeping.
            state = load_checkpoint(directory)
    return newer_of(state, run_dir)


def should_checkpoint(cfg: Config, epoch: int) -> bool:
    return (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch == cfg.train.epochs - 1


def node_count(node_id: str) -> int:
    """How many Ray nodes the workers span (every rank joins the gather)."""
    if not dist.is_initialized():
        return 1
    node_ids: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(node_ids, node_id)
    return len(set(node_ids))


def configure_logging(verbose: bool) -> None:
    """INFO lines of the `sparsedist` logger to stdout, which Ray forwards to the driver and `ray job logs`
    (unless the process already configured logging); Ray Train's per-report lines only when `verbose`."""
    # Ray Train logs "Reporting training result ..." (twice an epoch per worker) on a logger named after
    # its source file, which its LoggingConfig level does not reach.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def start_state(cfg: Config) -> dict[str, Any] | None:
    """The state this attempt starts from: the run's newest checkpoint, else (PBT's exploit) run.init_from's,
    loaded on the CPU (the loop moves it onto the model's device); None for a fresh start."""
    state = restored_state(cfg.run.run_dir)
    if state is None and cfg.run.init_from is not None:
        with storage.local_view(cfg.run.init_from) as start:
            state = load_checkpoint(start)
    return state


def start_on_every_rank(cfg: Config, rank: int, world_size: int, device) -> tuple[dict[str, Any] | None, Any]:
    """The start state and the loaders, with the ranks agreeing on the outcome: a host that cannot read them
    (storage it cannot reach, a data copy that does not verify) stops every rank within seconds with its
    error, where the others would wait in their first collective until the process group times out."""
    state = loaders = failure = None
    try:
        state = start_state(cfg)
        epoch = 0 if state is None else state["epoch"] + 1
        loaders = build_loaders(cfg, rank=rank, world_size=world_size, device=device, epoch=epoch)
    except Exception as error:  # noqa: BLE001 (any failure here must reach the other ranks)
        failure = f"rank {rank} on {ray.util.get_node_ip_address()}: {type(error).__name__}: {error}"
    failures = gather_failures(failure)
    if failures:
        raise StartError("cannot start on every host: " + "; ".join(failures))
    return state, loaders


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; `config` is `Config.to_dict()` with run.run_dir absolute or a URI."""
    try:
        run_replica(validate(config))
    except DETERMINISTIC_ERRORS as error:
        # Every rank meets it at the same point and returns normally: Ray Train retries failed workers,
        # and a retry would replay this failure run.max_failures times. The reason goes into the run
        # directory, where the driver finds it (`launch.train` reports the run as failed): written by every
        # rank (the same bytes), so that a host that cannot reach the storage does not lose it.
        try:
            record_failure(config["run"]["run_dir"], f"{type(error).__name__}: {error}")
        except (OSError, storage.StorageError):
            if ray.train.get_context().get_world_size() == 1:
                raise


def run_replica(cfg: Config) -> None:
    # Deterministic cuBLAS reductions (see `train.loop.train`); read when CUDA initializes, so set first.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    run_dir = cfg.run.run_dir
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    node_id = ray.get_runtime_context().get_node_id()
    mirror = RunMirror(run_dir)
    record_pid(mirror.local, rank, node_id)
    configure_logging(cfg.run.verbose)
    nodes = node_count(node_id)

    resume_state, loaders = start_on_every_rank(cfg, rank, world_size, device)
    last_done_epoch = -1 if resume_state is None else resume_state["epoch"]
    partial = None if resume_state is None else resume_state.get("partial_epoch")  # a mid-epoch checkpoint's

    sinks, tensorboard = [], None
    if rank == 0:
        mirror.restore()
        record = provenance(device, world_size, nodes)
        with open(mirror.path(ATTEMPTS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"start_epoch": last_done_epoch + 1, "start_batch": partial["batches"] if partial else 0,
                                     "started_at": time.time(), **record}, sort_keys=True) + "\n")
        mirror.publish()  # now, not at the next checkpoint: an attempt that dies first still counts
        log.info(banner(run_dir, storage.join(run_dir, TENSORBOARD_DIR), record))
        if resume_state is not None:
            log.info(f"  resuming after epoch {last_done_epoch + 1}" + (f", batch {partial['batches']}" if partial else "")
                     + f" (step {resume_state['step']})")
        metrics_path = mirror.path(METRICS_FILE)
        # Records past the restored checkpoint belong to an attempt whose work is about to be redone.
        rewind_jsonl(metrics_path, last_done_epoch, partial["batches"] if partial else None)
        tensorboard = TensorBoardSink(mirror.path(TENSORBOARD_DIR),
                                      purge_step=None if resume_state is None else resume_state["step"] + 1)
        sinks = [JsonLinesSink(metrics_path), tensorboard, *tracking_sinks(cfg)]
    attempt_start, first_epoch = time.monotonic(), last_done_epoch + 1

    def checkpoint_for_ray(staging: str, name: str, state: dict[str, Any], *copies: str) -> ray.train.Checkpoint:
        """Rank 0: `state` saved as checkpoint `name` (and as `copies`), then the run files published: the run
        directory is complete up to every checkpoint Ray registers."""
        save_checkpoint(state, os.path.join(staging, name), *copies)
        tensorboard.flush()
        published = mirror.publish()
        if published:
            log.info(f"  {name}: {published:,} bytes of run files published to {run_dir}")
        return ray.train.Checkpoint.from_directory(os.path.join(staging, name))

    def on_epoch_end(end: EpochEnd) -> None:
        with tempfile.TemporaryDirectory(prefix="sparsedist-ckpt-") as staging:
            checkpoint, name = None, checkpoint_name(end.epoch)
            if rank == 0:
                seconds_per_epoch = (time.monotonic() - attempt_start) / (end.epoch - first_epoch + 1)
                log.info(epoch_line(end.record, cfg.train.epochs, seconds_per_epoch))
                # Ray copies the epoch checkpoint into the run directory under the same, epoch-derived name: a
                # restarted attempt that redoes this epoch re-registers the same directory.
                best = [mirror.path(BEST_DIR)] if end.is_best else []
                if should_checkpoint(cfg, end.epoch):
                    checkpoint = checkpoint_for_ray(staging, name, end.state(), *best)
                elif best:
                    save_checkpoint(end.state(), *best)
            ray.train.report(flatten_epoch(end.record), checkpoint=checkpoint,
                             checkpoint_dir_name=name if checkpoint is not None else None)

    answered = False

    def checkpoint_requested() -> bool:
        """A preemption notice (a node of this run drained with a deadline) not answered yet in this attempt.
        Asked by every rank at the same batches: Ray agrees on the answer in a barrier."""
        nonlocal answered
        notice = ray.train.get_preemption_info()
        if notice is None or answered:
            return False
        answered = True
        if rank == 0:
            deadline = "" if notice.deadline_ms is None else f", {notice.deadline_ms / 1000 - time.time():.0f}s before the deadline"
            log.info(f"  preemption notice for ranks {notice.preempted_ranks}{deadline}: checkpointing now")
        return True

    def on_mid_epoch(mid: MidEpoch) -> None:
        """The checkpoint a preemption notice asks for, registered like an epoch's: the restart loses at most
        run.preemption_check_steps steps. Tune trials do not see its report (`forwarding`)."""
        with tempfile.TemporaryDirectory(prefix="sparsedist-ckpt-") as staging:
            checkpoint, name = None, None
            if rank == 0:
                state = mid.state()
                name = state_checkpoint_name(state)
                checkpoint = checkpoint_for_ray(staging, name, state)
            ray.train.report({MID_EPOCH_METRIC: mid.step}, checkpoint=checkpoint, checkpoint_dir_name=name)

    try:
        train(cfg, loaders, device=device, sinks=sinks, on_epoch_end=on_epoch_end, resume_state=resume_state,
              checkpoint_requested=checkpoint_requested, on_mid_epoch=on_mid_epoch)
        if tensorboard is not None:
            summary = summarize(read_jsonl(mirror.path(METRICS_FILE)), select_keep_ratio=cfg.eval.select_keep_ratio)
            tensorboard.write_hparams(cfg.to_dict(), summary_metrics(summary), step=summary["steps"])
    finally:
        for sink in sinks:
            sink.close()
        if rank == 0:
            mirror.publish()
