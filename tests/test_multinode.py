"""The one multi-node case the multi-host test bed (`tests/test_hosts.py`, S3 only) does not cover: a run
directory in GCS. Several raylets on this machine (`ray.cluster_utils.Cluster`: a head with no CPUs and two
1-CPU worker nodes, so the two 1-CPU workers sit on different nodes) inherit Google's default credentials
from the test; a GCS API server on 127.0.0.1 holds the run directory, an S3 one the data and the
reference run. The same 2-node run in both must end bitwise equal, and eval reads its best/ from GCS."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest
import torch

from sparsedist import storage
from sparsedist.cli import main as cli
from sparsedist.config import load_config
from sparsedist.launch.cluster import EMBEDDED_ENV
from sparsedist.launch.train import run_training
from sparsedist.logging import read_jsonl
from sparsedist.rundir import RunMirror
from sparsedist.train.checkpoint import load_checkpoint
from tests import gcs
from tests.s3 import new_bucket, s3_server

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
    for _ in range(2):
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
