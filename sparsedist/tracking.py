"""MLflow tracking (`tracking.backend: mlflow`): one MLflow run per sparsedist run directory.

Rank 0 finds the MLflow run of its run directory (tag `sparsedist.run_dir`), or creates it with the whole
config as params, and logs every record under its TensorBoard names (`logging.tensorboard_scalars`) at
the record's global step, so a resumed run, or a sweep trial, keeps one MLflow run. When the run ends, the
launch logs config.yaml, summary.json and the report figures as artifacts and closes the MLflow run.
A sweep's trials are runs like any other: one MLflow run each, named by the trial id.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from sparsedist import storage
from sparsedist.config import Config
from sparsedist.extras import require
from sparsedist.logging import Sink, flatten_hparams, tensorboard_scalars

RUN_DIR_TAG = "sparsedist.run_dir"
# MLflow takes at most this many params or metrics in one log_batch call.
BATCH_LIMIT = 100


def _client(cfg: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def _find_run(client, cfg: Config, experiment_id: str | None = None):
    """The MLflow run of cfg's run directory, or None."""
    experiment_id = experiment_id or _experiment_id(client, cfg.tracking.experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{cfg.run.run_dir}'",
                              max_results=1)
    return runs[0] if runs else None


def _start_run(client, cfg: Config) -> str:
    """The id of cfg's MLflow run, created with the config as params on first use, marked running."""
    from mlflow.entities import Param

    experiment_id = _experiment_id(client, cfg.tracking.experiment)
    run = _find_run(client, cfg, experiment_id)
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")  # a resumed run directory continues its MLflow run
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags={RUN_DIR_TAG: cfg.run.run_dir})
    params = [Param(key, str(value)) for key, value in flatten_hparams(cfg.to_dict()).items()]
    for start in range(0, len(params), BATCH_LIMIT):
        client.log_batch(run.info.run_id, params=params[start:start + BATCH_LIMIT])
    return run.info.run_id


class MlflowSink:
    """Rank 0's records as MLflow metrics, under their TensorBoard tags at the record's step.

    Step records are buffered and sent with their epoch's record (and on close): a network call per logged
    step would stall rank 0, and every replica waiting for it, inside the training step.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending: list = []

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending += [Metric(tag, value, timestamp, record["step"]) for tag, value in tensorboard_scalars(record).items()]
        if record["kind"] == "epoch":
            self._send()

    def _send(self) -> None:
        for start in range(0, len(self._pending), BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=self._pending[start:start + BATCH_LIMIT])
        self._pending = []

    def close(self) -> None:
        self._send()  # the launch ends the MLflow run once the run's outputs exist (`log_outputs`)


def require_backend(cfg: Config) -> None:
    """MissingExtraError before anything starts when cfg's tracking backend is not installed."""
    if cfg.tracking.backend == "mlflow":
        require("mlflow", "tracking.backend: mlflow")


def tracking_sinks(cfg: Config) -> list[Sink]:
    """Rank 0's tracking sinks for cfg (none without a tracking backend)."""
    if cfg.tracking.backend != "mlflow":
        return []
    client = _client(cfg)
    return [MlflowSink(client, _start_run(client, cfg))]


def log_outputs(cfg: Config, status: str = "FINISHED") -> None:
    """Log a run directory's outputs to its MLflow run (config.yaml; summary.json and the report figures once
    it completed) and end the MLflow run with `status` (FINISHED, KILLED for a stopped trial, FAILED)."""
    from sparsedist.report.page import ReportError, unread_by_reports, write_report
    from sparsedist.rundir import CONFIG_FILE, SUMMARY_FILE

    if cfg.tracking.backend != "mlflow":
        return
    client = _client(cfg)
    run = _find_run(client, cfg)
    # None: the run failed before rank 0 started it. Ended: logged already (a trial that had ended before
    # `tune --resume`); a resumed or overwritten run directory is marked running again by `_start_run`.
    if run is None or run.info.status != "RUNNING":
        return
    run_id = run.info.run_id
    # A run directory in object storage is read from a temporary local copy (without its checkpoints).
    with storage.local_view(cfg.run.run_dir, exclude=unread_by_reports) as run_dir:
        for name in (CONFIG_FILE, SUMMARY_FILE):
            if os.path.isfile(os.path.join(run_dir, name)):
                client.log_artifact(run_id, os.path.join(run_dir, name))
        if os.path.isfile(os.path.join(run_dir, SUMMARY_FILE)):
            with tempfile.TemporaryDirectory(prefix="sparsedist-figures-") as figures:
                try:
                    write_report([run_dir], figures)
                except ReportError:  # completed without an evaluated epoch: nothing to draw
                    pass
                else:
                    client.log_artifacts(run_id, figures, artifact_path="figures")
    client.set_terminated(run_id, status=status)
