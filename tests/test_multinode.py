"""Runs across Ray nodes whose only shared storage is S3: several raylets on this machine
(`ray.cluster_utils.Cluster`: a head with no CPUs and three 1-CPU worker nodes, so two 1-CPU workers
must sit on different nodes) and a real S3 API server on 127.0.0.1 holding run directories and data. One 2-node run, then the same run
losing the node of rank 0 mid-training: Ray Train restarts it on the remaining nodes from its last
checkpoint registered on S3, and it must end bitwise equal to the uninterrupted run. The same run with its
directory in GCS (a GCS API server on 127.0.0.1 too) must also end bitwise equal. Last, a sweep whose
directory is in the bucket. The third node is
the replacement, up from the start: `Cluster.add_node` fails when called from the thread that watches
the run. Network scope here; the SIGKILL restart test in test_launch_ray covers layer scope."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparsedist import storage
from sparsedist.cli import main as cli
from sparsedist.report.page import REPORT_MD
from sparsedist.config import load_config
from sparsedist.launch.cluster import EMBEDDED_ENV
from sparsedist.launch.train import run_training
from sparsedist.launch.tune import run_sweep, sweep_spec
from sparsedist.logging import read_jsonl
from sparsedist.rundir import RunMirror
from sparsedist.train.checkpoint import load_checkpoint
from tests import gcs
from tests.s3 import list_keys, new_bucket, s3_server
from tests.test_launch_ray import registered
from tests.test_tensorboard_sink import assert_events_match_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

EPOCHS = 4
TIMING_FIELDS = ("epoch_time_s", "images_per_sec")
NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def bucket():
    with s3_server():
        yield new_bucket()


@pytest.fixture(scope="module")
def gcs_endpoint():
    with gcs.gcs_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def cluster(bucket, gcs_endpoint):  # after the S3 and GCS servers: the nodes inherit AWS_* and Google's credentials
    for name, value in EMBEDDED_ENV.items():  # before Ray's first import, as for an embedded cluster
        os.environ.setdefault(name, value)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(**NODE_ARGS)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def data_root(bucket):
    """Prepared data in the bucket too: the driver builds and uploads it, each node fetches a verified copy."""
    root = f"s3://{bucket}/data"
    yield root
    shutil.rmtree(storage.working_dir(root, "data"))


def network_smoke(run_dir: str, data_root: str, *extra: str):
    return load_config("smoke", [f"run.run_dir={run_dir}", f"data.root={data_root}", "sparsity.scope=network",
                                 "scaling.num_workers=2", f"train.epochs={EPOCHS}", *extra])


def worker_nodes(run_dir: str) -> dict[int, str]:
    """rank -> Ray node id, from the pid files of the current attempt (kept in the node-local mirror;
    the fake nodes share this machine's disk)."""
    directory = os.path.join(RunMirror(run_dir).local, "pids")
    return {int(name.removeprefix("rank").removesuffix(".pid")): open(os.path.join(directory, name)).read().split()[2]
            for name in os.listdir(directory)}


def history(run_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(storage.join(run_dir, "metrics.jsonl"))]


def final_state(run_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as local:
        assert storage.download(storage.join(run_dir, f"epoch_{EPOCHS - 1:05d}"), local)
        return load_checkpoint(local)


@pytest.fixture(scope="module")
def reference(cluster, bucket, data_root):
    run_dir = f"s3://{bucket}/runs/reference"
    started = time.monotonic()
    summary = run_training(network_smoke(run_dir, data_root))
    return run_dir, summary, worker_nodes(run_dir), time.monotonic() - started


def test_two_workers_on_two_nodes_write_a_complete_run_directory_to_s3(reference, bucket):
    run_dir, summary, nodes, seconds = reference
    print(f"2-node S3 run: {seconds:.1f}s")
    assert len(set(nodes.values())) == 2, nodes
    assert (summary["provenance"]["nodes"], summary["provenance"]["world_size"]) == (2, 2)
    assert summary["epochs_completed"] == EPOCHS and summary["run_dir"] == run_dir
    keys = list_keys(bucket, "runs/reference/")
    for name in ("config.yaml", "metrics.jsonl", "attempts.jsonl", "summary.json", "best/state.pt", "best/COMPLETE",
                 f"epoch_{EPOCHS - 1:05d}/state.pt", f"epoch_{EPOCHS - 1:05d}/COMPLETE"):
        assert f"runs/reference/{name}" in keys, name
    assert any(key.startswith("runs/reference/tensorboard/events.out.tfevents") for key in keys)
    with tempfile.TemporaryDirectory() as local:
        storage.download(storage.join(run_dir, "tensorboard"), local)
        accumulator = EventAccumulator(local, size_guidance={"scalars": 0})
        accumulator.Reload()
    assert_events_match_jsonl(accumulator, read_jsonl(storage.join(run_dir, "metrics.jsonl")))


def test_report_and_eval_read_the_run_from_s3(reference, tmp_path, capsys):
    run_dir, summary = reference[:2]
    assert cli(["report", run_dir, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / REPORT_MD).is_file() and (tmp_path / "report" / "accuracy_vs_keep.png").is_file()
    assert cli(["eval", "--checkpoint", run_dir, "--json", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    # The best/ checkpoint from the bucket gives back the run's own validation-selected accuracies.
    assert evaluation["epoch"] == summary["selected"]["epoch"]
    assert evaluation["accuracy"]["test"] == pytest.approx(summary["selected"]["test"])


def test_the_same_run_in_gcs_reproduces_the_s3_run_bitwise_and_evaluates_from_there(reference, gcs_endpoint, data_root,
                                                                                    tmp_path):
    run_dir = f"gs://{gcs.new_bucket(gcs_endpoint)}/runs/reference?endpoint_override={gcs_endpoint}&scheme=http"
    summary = run_training(network_smoke(run_dir, data_root))
    assert len(set(worker_nodes(run_dir).values())) == 2 and summary["epochs_completed"] == EPOCHS
    state, expected = final_state(run_dir), final_state(reference[0])
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert history(run_dir) == history(reference[0])
    assert cli(["eval", "--checkpoint", run_dir, "--json", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["epoch"] == summary["selected"]["epoch"]
    assert evaluation["accuracy"]["test"] == pytest.approx(summary["selected"]["test"])


def test_losing_a_node_restarts_from_the_s3_checkpoint_and_reproduces_the_run_bitwise(
        reference, cluster, bucket, data_root):
    run_dir = f"s3://{bucket}/runs/node-lost"
    mirror_metrics = os.path.join(RunMirror(run_dir).local, "metrics.jsonl")
    removed: list[str] = []

    def lose_rank0_node_in_epoch(epoch: int) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.exists(mirror_metrics) and registered(run_dir, epoch - 1) and any(
                    r["kind"] == "step" and r["epoch"] >= epoch for r in read_jsonl(mirror_metrics)):
                node_id = worker_nodes(run_dir)[0]
                node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                cluster.remove_node(node, allow_graceful=False)  # as a preempted VM: no goodbye
                removed.append(node_id)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_rank0_node_in_epoch, args=(2,))
    killer.start()
    try:
        # Until Ray notices the node is gone (its health checks), a restart may be placed on it and fail
        # again: allow a few restarts, as on a preemptible cluster.
        summary = run_training(network_smoke(run_dir, data_root, "run.max_failures=3"))
    finally:
        killer.join()
    assert removed, "the run finished before the node was removed"
    starts = [attempt["start_epoch"] for attempt in read_jsonl(storage.join(run_dir, "attempts.jsonl"))]
    # Every restarted attempt began past epoch 0: from the checkpoint registered on S3, not from scratch.
    assert len(starts) >= 2 and starts[0] == 0 and all(start > 0 for start in starts[1:]), starts
    assert summary["attempts"] == len(starts) and removed[0] not in worker_nodes(run_dir).values()
    state, expected = final_state(run_dir), final_state(reference[0])
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert state["controller"] == expected["controller"] and state["sparsity"] == expected["sparsity"]
    assert history(run_dir) == history(reference[0])


def test_a_sweep_in_s3_runs_resumes_and_reports(cluster, bucket, data_root, tmp_path):
    # Two seeds of a one-epoch smoke run, one at a time (the node-loss test left two 1-CPU nodes); each
    # trial's driver and worker land wherever Tune places them.
    sweep_dir = f"s3://{bucket}/sweeps/seeds"
    space = tmp_path / "space.yaml"
    space.write_text("run.seed: {grid: [0, 1]}\n")
    spec = sweep_spec("smoke", str(space), overrides=["train.epochs=1", f"data.root={data_root}"])
    trials = run_sweep(spec, sweep_dir, max_concurrent=1)
    assert sorted(t.status for t in trials) == ["completed", "completed"]
    keys = list_keys(bucket, "sweeps/seeds/")
    for name in ("sweep.yaml", "sweep.csv", "summary.md"):
        assert f"sweeps/seeds/{name}" in keys, name
    for trial in trials:
        assert trial.run.run_dir == f"{sweep_dir}/trials/{trial.trial_id}"
        for name in ("trial.json", "config.yaml", "metrics.jsonl", "summary.json", "epoch_00000/state.pt"):
            assert f"sweeps/seeds/trials/{trial.trial_id}/{name}" in keys, name
    # Resuming a finished sweep from the bucket restores Tune's state there and runs nothing again.
    resumed = run_sweep(spec, sweep_dir, max_concurrent=1, resume=True)
    assert [(t.trial_id, t.run.epochs) for t in resumed] == [(t.trial_id, t.run.epochs) for t in trials]
    # The HParams view in the bucket is the one last written, not every earlier write added up.
    written = os.path.join(storage.working_dir(sweep_dir, "sweeps"), "tensorboard")
    assert sorted(key.removeprefix("sweeps/seeds/tensorboard/") for key in list_keys(bucket, "sweeps/seeds/tensorboard/")) \
        == sorted(os.path.relpath(os.path.join(root, name), written) for root, _, names in os.walk(written) for name in names)
    assert cli(["report", sweep_dir, "--out", str(tmp_path / "report")]) == 0
