"""Runs on a real multi-host layout (`tests.hosts`): every Ray node its own network namespace, address and
disk, an S3 server on the bridge as the only shared storage, jobs sent with the `ray job submit` CLI from
this machine as a user would, with no environment variable set by hand on the hosts.

One uninterrupted 2-worker run is the reference; the run that loses whole hosts (rank 0's without notice, then
rank 1's after a preemption notice) and the run stopped with `ray job stop` and relaunched with `--resume` must end bitwise equal to it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import uuid

import pytest
import torch

from sparsedist import storage
from sparsedist.cli import main as cli
from sparsedist.data.preparation import MANIFEST
from sparsedist.logging import read_jsonl
from sparsedist.rundir import RunMirror, recorded_failure
from sparsedist.train.checkpoint import checkpoint_name, load_checkpoint
from tests.hosts import GCS_PORT, REPO, VENV_BIN, HostCluster, namespaces_unavailable

UNAVAILABLE = namespaces_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.multinode,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"multi-host test bed: {UNAVAILABLE}")]

RAY = str(VENV_BIN / "ray")
EPOCHS = 5
TIMING_FIELDS = ("epoch_time_s", "images_per_sec")
COMMIT = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                        text=True).stdout.strip() or "unknown"


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    hosts = HostCluster()
    try:
        hosts.start(workers=3)  # two for the workers, one spare
        print(f"test bed up in {time.monotonic() - started:.1f}s")
        saved = {name: os.environ.get(name) for name in hosts.client_env()}
        os.environ.update(hosts.client_env())  # report/eval/export below read the bucket from this machine
        try:
            yield hosts
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        hosts.close()


@pytest.fixture(scope="module")
def bucket(cluster):
    import boto3

    name = f"bucket-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=cluster.s3_endpoint).create_bucket(Bucket=name)
    return name


def ray_cli(cluster: HostCluster, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **cluster.client_env()}
    return subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=check)


def submit(cluster: HostCluster, entrypoint: list[str], *, wait: bool = True) -> tuple[str, subprocess.CompletedProcess | None]:
    """`ray job submit` of `entrypoint` with the project's runtime env; without `wait`, returns once the job
    is accepted."""
    submission_id = f"job-{uuid.uuid4().hex[:8]}"
    args = ["job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
            "--runtime-env", "cluster/runtime-env.yaml", *([] if wait else ["--no-wait"]), "--", *entrypoint]
    deadline = time.monotonic() + 90
    while True:
        result = ray_cli(cluster, *args)
        # A fresh head accepts jobs once its job agent has registered (seconds after `ray start`).
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    if not wait:
        assert result.returncode == 0, result.stderr
        return submission_id, None
    return submission_id, result


def job_status(cluster: HostCluster, submission_id: str) -> str:
    return ray_cli(cluster, "job", "status", submission_id, "--address", cluster.dashboard, check=True).stdout


def wait_for_job(cluster: HostCluster, submission_id: str, timeout: float = 600) -> str:
    """The job's final status line, once it has one (succeeded, failed or stopped)."""
    deadline = time.monotonic() + timeout
    while not any(word in (status := job_status(cluster, submission_id)) for word in ("succeeded", "failed", "stopped")):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    return status


def train_command(run_dir: str, data_root: str, *extra: str) -> list[str]:
    sets = [f"data.root={data_root}", "sparsity.scope=network", "scaling.num_workers=2", f"train.epochs={EPOCHS}",
            *extra]
    return ["python", "-m", "sparsedist", "train", "--config", "smoke", "--run-dir", run_dir,
            *(word for item in sets for word in ("--set", item))]


def registered(run_dir: str, epoch: int) -> bool:
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    return storage.is_file(snapshot) and checkpoint_name(epoch) in storage.read_bytes(snapshot).decode()


def wait_until(condition, timeout: float = 300, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(poll)


def history(run_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(storage.join(run_dir, "metrics.jsonl"))]


def final_state(run_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as local:
        assert storage.download(storage.join(run_dir, checkpoint_name(EPOCHS - 1)), local)
        return load_checkpoint(local)


def assert_bitwise_equal(run_dir: str, reference_dir: str) -> None:
    state, expected = final_state(run_dir), final_state(reference_dir)
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert state["controller"] == expected["controller"] and state["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    assert history(run_dir) == history(reference_dir)


def start_epochs(run_dir: str) -> list[int]:
    return [attempt["start_epoch"] for attempt in read_jsonl(storage.join(run_dir, "attempts.jsonl"))]


def host_mirror(run_dir: str) -> str:
    """Rank 0's node-local mirror of `run_dir` as a host sees it: under its own /tmp (whatever TMPDIR says here)."""
    return os.path.join("/tmp", os.path.relpath(RunMirror(run_dir).local, tempfile.gettempdir()))


def rank_nodes(cluster: HostCluster, run_dir: str) -> dict[int, tuple[str, str]]:
    """rank -> (host name, Ray node id), from the pid file each rank writes on its own host (the newest per rank)."""
    found: dict[int, tuple[float, str, str]] = {}
    for name, host in cluster.hosts.items():
        for path in host.listing(os.path.join(host_mirror(run_dir), "pids")):
            if "/rank" in path:
                rank = int(os.path.basename(path).removeprefix("rank").removesuffix(".pid"))
                written = float(host.run("stat", "-c", "%.9Y", path).stdout)
                if rank not in found or written > found[rank][0]:
                    found[rank] = (written, name, host.read_file(path).decode().split()[2])
    return {rank: (name, node_id) for rank, (_, name, node_id) in found.items()}


def rank_hosts(cluster: HostCluster, run_dir: str) -> dict[int, str]:
    return {rank: name for rank, (name, _) in rank_nodes(cluster, run_dir).items()}


@pytest.fixture(scope="module")
def data_root(bucket):
    return f"s3://{bucket}/data"


@pytest.fixture(scope="module")
def reference(cluster, bucket, data_root):
    run_dir = f"s3://{bucket}/runs/reference"
    started = time.monotonic()
    # The working dir travels without .git: the commit is named as docs/ray.md says.
    submission_id, result = submit(cluster, ["env", f"SPARSEDIST_COMMIT={COMMIT}", *train_command(run_dir, data_root)])
    seconds = time.monotonic() - started
    print(f"reference job: {seconds:.1f}s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return run_dir, result.stdout, seconds


def test_a_job_on_two_hosts_fetches_data_per_host_and_writes_a_complete_run_directory(cluster, bucket, reference,
                                                                                      tmp_path):
    run_dir, logs, _ = reference
    summary = json.loads(storage.read_bytes(storage.join(run_dir, "summary.json")))
    assert summary["epochs_completed"] == EPOCHS
    assert (summary["provenance"]["nodes"], summary["provenance"]["world_size"]) == (2, 2)
    assert summary["provenance"]["commit"] == COMMIT
    keys = [key.removeprefix("runs/reference/") for key in list_keys(cluster, bucket, "runs/reference/")]
    for name in ("config.yaml", "metrics.jsonl", "attempts.jsonl", "summary.json", "best/state.pt", "best/COMPLETE",
                 f"{checkpoint_name(EPOCHS - 1)}/state.pt", f"{checkpoint_name(EPOCHS - 1)}/COMPLETE"):
        assert name in keys, name
    assert any(key.startswith("tensorboard/events.out.tfevents") for key in keys)
    # Each host that ran a rank fetched its own copy of the data into its private cache and verified it.
    manifest = json.loads(storage.read_bytes(next(storage.join(f"s3://{bucket}/data", name, MANIFEST)
                                                  for name in storage.list_dir(f"s3://{bucket}/data"))))
    workers = sorted(set(rank_hosts(cluster, run_dir).values()))
    assert len(workers) == 2 and "head" not in workers, workers
    for name in workers:
        host = cluster.hosts[name]
        copies = [path for path in host.listing("/tmp/sparsedist-data") if path.endswith("/" + MANIFEST)]
        assert len(copies) == 1, (name, copies)
        directory = os.path.dirname(copies[0])
        for record in manifest["splits"].values():
            digest = host.run("sha256sum", f"{directory}/{record['file']}").stdout.split()[0]
            assert digest == record["sha256"], (name, record["file"])
    # The job ran the uploaded working tree, which left the virtualenv behind, and its log ends with the table.
    shipped = cluster.hosts["head"].listing("/tmp/ray/session_latest/runtime_resources/working_dir_files")
    assert any(path.endswith("/sparsedist/launch/train.py") for path in shipped)
    assert not any("/.venv/" in path or "/.git/" in path for path in shipped)
    assert "keep  final val  final test" in logs
    # report, eval and export read the run from outside the cluster.
    assert cli(["report", run_dir, "--out", str(tmp_path / "report")]) == 0
    assert cli(["eval", run_dir, "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["epoch"] == summary["selected"]["epoch"]
    assert cli(["export", run_dir, "--out", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "config.json").is_file()


def list_keys(cluster: HostCluster, bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=cluster.s3_endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/"))


def newest_registered_epoch(run_dir: str) -> int:
    """The newest epoch whose checkpoint Ray has registered (-1: none yet)."""
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.is_file(snapshot):
        return -1
    return max((int(epoch) for epoch in re.findall(r"epoch_(\d{5})", storage.read_bytes(snapshot).decode())), default=-1)


def registered_mid_epoch(run_dir: str) -> bool:
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    return storage.is_file(snapshot) and re.search(r"epoch_-?\d{4,5}_b\d{7}", storage.read_bytes(snapshot).decode()) is not None


def test_b_losing_whole_hosts_resumes_on_spare_hosts_and_ends_bitwise_equal(cluster, bucket, data_root, reference):
    # One run loses the host of rank 0 without notice once epoch 1 is registered; then the attempt that replaced
    # it has the host of rank 1 drained as a spot reclaim is (a preemption with a deadline) as soon as it starts:
    # the run checkpoints mid-epoch, and the host is lost after. A replacement host joins after each loss.
    run_dir = f"s3://{bucket}/runs/hosts-lost"
    command = train_command(run_dir, data_root, "run.max_failures=4", "run.preemption_check_steps=1")
    submission_id, _ = submit(cluster, command, wait=False)
    uploaded = {}

    def registered_since() -> bool:
        if "at" not in uploaded and storage.is_file(storage.join(run_dir, checkpoint_name(1), "COMPLETE")):
            uploaded["at"] = time.monotonic()
        return newest_registered_epoch(run_dir) >= 1

    wait_until(registered_since, poll=0.1)
    lag = time.monotonic() - uploaded.get("at", time.monotonic())
    first = rank_hosts(cluster, run_dir)[0]
    cluster.lose(first)
    print(f"rank 0's host {first} lost after epoch 1; its checkpoint registered {lag:.1f}s after upload")
    cluster.add_ray_host(f"{first}x")

    wait_until(lambda: len(start_epochs(run_dir)) == 2, poll=0.1)
    second, node_id = rank_nodes(cluster, run_dir)[1]
    drained = time.monotonic()
    ray_cli(cluster, "drain-node", "--address", f"{cluster.head_address}:{GCS_PORT}", "--node-id", node_id,
            "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
            "--deadline-remaining-seconds", "120", check=True)
    try:
        wait_until(lambda: registered_mid_epoch(run_dir), timeout=120, poll=0.1)
    except TimeoutError:
        logs = ray_cli(cluster, "job", "logs", submission_id, "--address", cluster.dashboard).stdout
        raise AssertionError(f"no mid-epoch checkpoint after the drain; the job's log ends:\n{logs[-6000:]}") from None
    print(f"rank 1's host {second} drained; a mid-epoch checkpoint registered {time.monotonic() - drained:.1f}s later")
    cluster.lose(second)
    cluster.add_ray_host(f"{second}x")
    lost_at = time.monotonic()
    status = wait_for_job(cluster, submission_id)
    print(f"job done {time.monotonic() - lost_at:.1f}s after the second loss")
    assert "succeeded" in status, status
    attempts = read_jsonl(storage.join(run_dir, "attempts.jsonl"))
    starts = [(attempt["start_epoch"], attempt["start_batch"]) for attempt in attempts]
    # Each restart began past the work done before its loss: the second one mid-epoch, at the preemption checkpoint.
    assert len(starts) == 3 and starts[0] == (0, 0) and starts[1][0] >= 2 and starts[2] > (starts[1][0], 0), starts
    assert starts[2][1] > 0, starts
    assert not {first, second} & set(rank_hosts(cluster, run_dir).values())
    assert_bitwise_equal(run_dir, reference[0])


def test_c_a_stopped_job_relaunched_with_resume_continues_and_ends_bitwise_equal(cluster, bucket, data_root, reference):
    run_dir = f"s3://{bucket}/runs/stopped"
    submission_id, _ = submit(cluster, train_command(run_dir, data_root), wait=False)
    wait_until(lambda: registered(run_dir, 1), poll=0.1)
    ray_cli(cluster, "job", "stop", submission_id, "--address", cluster.dashboard, check=True)
    assert "stopped" in wait_for_job(cluster, submission_id)
    # The documented relaunch: the same command with --resume, under a new submission id.
    _, result = submit(cluster, [*train_command(run_dir, data_root), "--resume"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    starts = start_epochs(run_dir)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 2, starts
    assert_bitwise_equal(run_dir, reference[0])


def test_d_a_sweep_in_the_bucket_survives_the_loss_of_its_driver(cluster, bucket, data_root, tmp_path):
    sweep_dir = f"s3://{bucket}/sweeps/reset"
    command = ["python", "-m", "sparsedist", "tune", "--config", "smoke", "--space", "tune_spaces/adaptive_reset.yaml",
               "--num-samples", "2", "--max-concurrent", "1", "--sweep-dir", sweep_dir,
               "--set", "train.epochs=1", "--set", f"data.root={data_root}"]
    submission_id, _ = submit(cluster, command, wait=False)

    def started_trials() -> list[str]:  # one at a time: a trial starts once the one before it finished
        return sorted(key.split("/")[3] for key in list_keys(cluster, bucket, "sweeps/reset/trials/")
                      if key.endswith("/attempts.jsonl"))

    wait_until(lambda: len(started_trials()) == 2, poll=0.5)
    ray_cli(cluster, "job", "stop", submission_id, "--address", cluster.dashboard, check=True)
    assert "stopped" in wait_for_job(cluster, submission_id)
    finished = started_trials()[0]
    _, result = submit(cluster, [*command, "--resume"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "2 trials: 2 completed" in result.stdout
    # The trial finished before the driver was lost did not run again.
    assert len(read_jsonl(f"{sweep_dir}/trials/{finished}/attempts.jsonl")) == 1
    assert cli(["report", sweep_dir, "--out", str(tmp_path / "report")]) == 0


def test_e_data_unusable_on_one_host_stops_every_rank_at_once_without_retries(cluster, bucket, data_root):
    # One worker host loses its route to the bucket; three workers, so one of them lands there.
    host = cluster.hosts[sorted(name for name in cluster.hosts if name.startswith("w"))[0]]
    host.run("ip", "route", "add", "blackhole", cluster.s3_endpoint.split("//")[1].split(":")[0])
    run_dir = f"s3://{bucket}/runs/unreachable"
    started = time.monotonic()
    _, result = submit(cluster, [*train_command(run_dir, data_root, "run.max_failures=3"), "--set", "scaling.num_workers=3",
                               "--set", "train.batch_size=48"])
    seconds = time.monotonic() - started
    print(f"data unusable on {host.name}: the job ended in {seconds:.1f}s")
    assert result.returncode != 0
    failure = recorded_failure(run_dir)
    assert failure is not None and f"on {host.address}" in failure, failure
    assert "cannot start on every host" in result.stdout
    assert seconds < 120  # far from the process group's 30-minute timeout, and no retries
