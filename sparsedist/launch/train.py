"""The training driver: a Ray Train `TorchTrainer` over `train_worker`, on an embedded local cluster or
the cluster RAY_ADDRESS names, with the run directory checked, followed and summarized.

    python -m sparsedist.launch.train --config smoke --run-dir runs/smoke [--set k=v ...] [--resume|--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TextIO

from sparsedist import storage
from sparsedist.config import CONFIG_HELP, Config, ConfigError, add_config_arguments, apply_overrides, load_sources, validate
from sparsedist.launch.cluster import RESOURCE_WAIT_S, ClusterError, ray_session
from sparsedist.rundir import (ATTEMPTS_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR, RunDirError,
                               check_run_dir, prepare_run_dir, recorded_failure)
from sparsedist.storage import StorageError
from sparsedist.tracking import log_outputs, require_backend
from sparsedist.report.summary import regime_table, summarize
from sparsedist.logging import JsonLinesTail, ProgressLine, read_jsonl

PROGRESS_POLL_S = 0.5


class LaunchError(RuntimeError):
    """Training failed (after the restarts run.max_failures allows); the message holds the workers' errors."""


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (`worker.train_worker`), imported in the worker process only: drivers,
    a Tune trial's among them, start without FFCV and the training code (seconds of imports per trial)."""
    from sparsedist.launch.worker import train_worker as run_worker

    run_worker(config)


def make_trainer(cfg: Config, *, callbacks: Sequence[Any] = ()):
    """A TorchTrainer for `cfg`, whose run.run_dir must be absolute or a URI (see `rundir.with_run_dir`).

    Ray's storage path is the run directory's parent (on its filesystem: local, S3, GCS, ...) and its
    name the directory's name: a relaunch with the same run_dir resumes from the checkpoints Ray
    registered there. `callbacks` are Ray Train UserCallbacks (Tune's per-trial driver passes its report
    callback). Ray Train's own INFO lines only with run.verbose.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sparsedist.launch.network import NodeInterfaceTorchConfig
    from sparsedist.provenance import COMMIT_ENV, source_commit

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    parent, name = storage.parent_and_name(cfg.run.run_dir)
    storage_path, filesystem = storage.ray_storage(parent)
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=NodeInterfaceTorchConfig(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         max_preemption_failures=cfg.run.max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=list(callbacks),
            # The driver's view of the source commit: a job's workers run a copy without .git.
            worker_runtime_env={"env_vars": {COMMIT_ENV: commit}} if (commit := source_commit()) else None,
            logging_config=LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
        ),
    )


def raise_run_error(run_dir: str) -> None:
    """LaunchError when the workers ended the run on a deterministic failure (`worker.DETERMINISTIC_ERRORS`:
    recorded in the run directory, never retried)."""
    failure = recorded_failure(run_dir)
    if failure is not None:
        raise LaunchError(f"training stopped (not retried: it would fail the same way again): {failure}\n"
                          f"run directory: {run_dir}")


@contextmanager
def following(metrics_path: str, progress: ProgressLine) -> Iterator[None]:
    """Feed the records rank 0 appends to metrics.jsonl to the progress line while the body runs."""
    if not progress.live:
        yield
        return
    tail = JsonLinesTail(metrics_path)
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            for record in tail.read_new():
                progress.update(record)
        for record in tail.read_new():
            progress.update(record)

    thread = threading.Thread(target=pump, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def write_json_atomic(location: str, data: dict[str, Any]) -> None:
    storage.write_bytes(location, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def refuse_relative_on_cluster(run_dir: str | None) -> None:
    """A run directory given relative (or not at all) would resolve on whichever node runs the driver, in
    a job's temporary working directory: on a cluster (RAY_ADDRESS) that is refused before anything starts."""
    if storage.driver_local_on_cluster(run_dir):
        raise RunDirError(
            f"run.run_dir={run_dir!r} is {'unset' if run_dir is None else 'relative'} while attached to a cluster "
            "(RAY_ADDRESS): it would resolve on the driver's node, in the job's temporary working directory. "
            "Give --run-dir an absolute path on shared storage or a URI such as s3://bucket/runs/<name>."
        )


def run_training(cfg: Config, *, resume: bool = False, overwrite: bool = False, stream: TextIO | None = None,
                 resource_wait_s: float = RESOURCE_WAIT_S) -> dict[str, Any]:
    """Train `cfg` through Ray Train and return the summary (also written to <run_dir>/summary.json).

    A terminal shows a live progress line (followed from a local run directory); anything else gets rank
    0's start banner and one line per epoch through the workers' log (what `ray job logs` shows).
    Raises RunDirError (run directory refused), StorageError, ClusterError (cluster unreachable or too
    small), DataUnavailableError, or LaunchError (training failed).
    """
    started = time.monotonic()
    # Refuse before starting anything.
    storage.check_usable(cfg.run.resolved_run_dir())
    check_run_dir(cfg, resume=resume, overwrite=overwrite)
    require_backend(cfg)
    stream = stream or sys.stdout
    progress = ProgressLine(cfg.train.epochs, stream,
                            live=stream.isatty() and not storage.is_uri(cfg.run.resolved_run_dir()))
    with ray_session(cfg.scaling, resource_wait_s=resource_wait_s, log_to_driver=not progress.live):
        from ray.train import TrainingFailedError  # only now: ray_session sets Ray's environment first

        from sparsedist.data import prepare  # torchvision and FFCV: only where data is prepared, not in Tune trials

        # Once, before any worker starts: data problems fail fast and the workers find the files ready.
        prepare(cfg.data)
        # Written only once the cluster and the data are known to work: a failed launch leaves no half-made run.
        cfg = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
        run_dir = cfg.run.run_dir
        metrics_path = storage.join(run_dir, METRICS_FILE)
        if progress.live:
            progress.skip(read_jsonl(metrics_path) if os.path.exists(metrics_path) else [])
        trainer = make_trainer(cfg)
        with following(metrics_path, progress):
            try:
                trainer.fit()
            except TrainingFailedError as error:
                log_outputs(cfg, status="FAILED")
                raise LaunchError(f"training failed (run.max_failures={cfg.run.max_failures}); the run "
                                  f"directory {run_dir} can be resumed with --resume.\n{error}") from None
        raise_run_error(run_dir)
    summary = summarize(read_jsonl(metrics_path), select_keep_ratio=cfg.eval.select_keep_ratio)
    attempts = read_jsonl(storage.join(run_dir, ATTEMPTS_FILE))
    summary.update(run_dir=run_dir, wall_time_s=time.monotonic() - started, attempts=len(attempts),
                   provenance={k: v for k, v in attempts[-1].items() if k not in ("start_epoch", "start_batch", "started_at")})
    write_json_atomic(storage.join(run_dir, SUMMARY_FILE), summary)
    log_outputs(cfg)  # MLflow: config, summary and figures as artifacts; ends the MLflow run
    return summary


def result_text(summary: dict[str, Any]) -> str:
    run_dir = summary["run_dir"]
    return "\n".join([
        regime_table(summary),
        "",
        f"run directory: {run_dir}  ({summary['epochs_completed']} epochs, {summary['wall_time_s']:.0f}s, "
        f"{summary['images_per_sec']:,.0f} images/s)",
        f"TensorBoard:   tensorboard --logdir {storage.join(run_dir, TENSORBOARD_DIR)} --host 127.0.0.1",
    ])


# ------------------------------------------------------------------------------------ command
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` flags, shared by `sparsedist train` and `python -m sparsedist.launch.train`."""
    add_config_arguments(parser, help=CONFIG_HELP + " (default: the built-in defaults; with --resume and --run-dir: "
                         "the run's own config.yaml)")
    parser.add_argument("--run-dir", help="run directory (default: run.run_dir, else ./runs/<run.name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run in the run directory first")
    parser.add_argument("--verbose", action="store_true", help="also show Ray Train's per-report log lines (run.verbose)")


def config_from_args(args: argparse.Namespace) -> Config:
    sources = args.config
    if sources is None and args.resume and args.run_dir:
        sources = [storage.join(storage.absolute(args.run_dir), CONFIG_FILE)]
    data = apply_overrides(load_sources(sources), args.overrides)
    if args.run_dir:
        data = apply_overrides(data, {"run.run_dir": args.run_dir})
    if args.verbose:
        data = apply_overrides(data, {"run.verbose": True})
    refuse_relative_on_cluster((data.get("run") or {}).get("run_dir"))
    return validate(data)


def launch_and_report(launch: Callable[[], dict[str, Any]]) -> int:
    """Run a launch and print its result, or a one-paragraph error; returns the command's exit code
    (2: the request cannot run as given, 1: training failed)."""
    from sparsedist.data import DataUnavailableError

    try:
        summary = launch()
    except (ConfigError, RunDirError, StorageError, ClusterError, DataUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result_text(summary))
    return 0


def train_from_args(args: argparse.Namespace) -> int:
    """`sparsedist train` for parsed arguments; returns the exit code."""
    return launch_and_report(lambda: run_training(config_from_args(args), resume=args.resume, overwrite=args.overwrite))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsedist.launch.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return train_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
