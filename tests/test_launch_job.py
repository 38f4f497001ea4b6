"""`ray job submit` against a real head started with the documented command (token auth, loopback): it
listens on loopback only, refuses a wrong token, and a bad config comes back FAILED with the error in the
job's logs. A job that trains, on several hosts, is in test_hosts."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.distributed import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
RAY_PACKAGE = importlib.util.find_spec("ray").submodule_search_locations[0]  # found without importing Ray
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@dataclass
class Head:
    dashboard: str  # the job submission address
    env: dict[str, str]  # what every Ray CLI call of the test runs with (auth mode and token)
    temp_dir: str


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The head started with --temp-dir temp_dir: Ray's executables and scripts naming that directory on
    their command line (gcs_server, raylet, dashboard, monitors), and their descendants (agents, workers)."""
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.startswith(RAY_PACKAGE) for part in cmdline[:3]) and any(temp_dir in part for part in cmdline):
            roots.append(process)
    found = {}
    for root in roots:
        try:
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            pass
    return list(found.values())


def stop_head(temp_dir: str) -> None:
    # Not `ray stop`: it would stop every Ray cluster on this machine, not only ours.
    processes = head_processes(temp_dir)
    for process in processes:
        process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        process.kill()


@pytest.fixture(scope="module")
def head():
    # Short: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="sdray", dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as handle:
        handle.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")  # the job's `python` is this venv's
    dashboard_port = free_port()
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, timeout=180, capture_output=True)
    try:
        yield Head(f"http://127.0.0.1:{dashboard_port}", env, temp_dir)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, *train_args: str) -> tuple[str, subprocess.CompletedProcess]:
    submission_id = f"sparsedist-test-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
               "--runtime-env", "cluster/runtime-env.yaml", "--", "python", "-m", "sparsedist.launch.train", *train_args]
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=600)
        # A fresh head accepts jobs once its job agent has registered (seconds after `ray start`).
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            return submission_id, result
        time.sleep(2)


def job_cli(head: Head, *args: str) -> str:
    return subprocess.run([RAY, "job", *args, "--address", head.dashboard], env=head.env, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_documented_head_listens_only_on_loopback(head):
    addresses = set()
    for process in head_processes(head.temp_dir):
        try:
            addresses |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    assert addresses and addresses <= set(LOOPBACK), addresses


def test_job_without_the_token_is_refused(head):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a wrong token
    result = subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "AuthenticationError" in result.stderr


def test_bad_config_job_fails_with_the_error_in_its_logs(head, tmp_path):
    started = time.monotonic()
    submission_id, result = submit(head, "--config", "smoke", "--run-dir", str(tmp_path / "run"),
                                   "--set", "model.depth=11")
    assert result.returncode != 0
    assert f"Job '{submission_id}' failed" in job_cli(head, "status", submission_id)
    logs = job_cli(head, "logs", submission_id)
    assert "invalid configuration" in logs and "model.depth: depth - 4 must be divisible by 6" in logs
    assert time.monotonic() - started < 120
