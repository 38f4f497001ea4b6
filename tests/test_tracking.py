"""MLflow tracking against a real MLflow tracking server on 127.0.0.1: `sparsedist train` with
`tracking.backend=mlflow` logs the config as params, every metric under its TensorBoard name and step, and
config, summary and figures as artifacts; all of it read back through MLflow's client. (A sweep's
one-run-per-trial is checked in test_tune.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedist.rundir import METRICS_FILE
from sparsedist.logging import read_jsonl, tensorboard_scalars
from sparsedist.tracking import RUN_DIR_TAG
from tests.mlflow_server import mlflow_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def tracked_run(client, experiment: str, run_dir: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


@pytest.mark.slow
def test_train_logs_params_metrics_and_artifacts_to_an_mlflow_server(tracking_uri, tmp_path):
    from mlflow import MlflowClient

    run_dir = str(tmp_path / "run")
    command = [sys.executable, "-m", "sparsedist.launch.train", "--config", "smoke", "--run-dir", run_dir]
    for override in (f"data.root={tmp_path / 'data'}", "tracking.backend=mlflow", f"tracking.uri={tracking_uri}",
                     "tracking.experiment=train-test"):
        command += ["--set", override]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    finished = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    client = MlflowClient(tracking_uri)
    run = tracked_run(client, "train-test", run_dir)
    assert (run.info.run_name, run.info.status) == ("smoke", "FINISHED")
    params = run.data.params
    assert (params["controller.tighten_pct"], params["model.depth"], params["run.seed"]) == ("0.1", "10", "0")

    # Every record's TensorBoard scalars, at the record's step, per step and per epoch.
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(os.path.join(run_dir, METRICS_FILE)):
        for tag, value in tensorboard_scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    for tag in ("train/loss", "train/keep_ratio", "epoch/loss", "eval/val/accuracy/keep_1.00", "eval/test/accuracy/keep_0.20"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert logged == sorted(expected[tag]), tag
    assert set(run.data.metrics) == set(expected)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/accuracy_vs_keep.png", "figures/keep_trajectory.png", "figures/train_vs_val.png"} <= figures
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary == json.loads((Path(run_dir) / "summary.json").read_text())
