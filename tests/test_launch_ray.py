"""Ray Train runs: one uninterrupted run through the command line on its own embedded cluster (the run
directory, the printed result, loopback-only services), then runs on an embedded cluster shared by the
rest of the module: workers SIGKILLed mid-run (restart by Ray, then stop + --resume) compared bitwise
with it, and a cluster too small for the config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparsedist.config import ScalingConfig, load_config
from sparsedist.launch.cluster import ClusterError, ray_session
from sparsedist.rundir import CONFIG_FILE, RunDirError
from sparsedist.report.summary import summarize
from sparsedist.launch.train import LaunchError, run_training
from sparsedist.logging import read_jsonl
from sparsedist.train.checkpoint import checkpoint_name, load_checkpoint
from tests.test_tensorboard_sink import assert_events_match_jsonl

pytestmark = pytest.mark.slow

EPOCHS = 4
TIMING_FIELDS = ("epoch_time_s", "images_per_sec")  # the only values allowed to differ between runs
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def overrides(run_dir, data_root, *extra) -> list[str]:
    return [f"run.run_dir={run_dir}", f"data.root={data_root}", "scaling.num_workers=2", f"train.epochs={EPOCHS}", *extra]


def smoke(run_dir, data_root, *extra):
    return load_config("smoke", overrides(run_dir, data_root, *extra))


def listening_sockets(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, local address, pid) of every listening socket of `root` and its descendants."""
    try:
        tree = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.Error:  # exited meanwhile
        return set()
    found = set()
    for connection in psutil.net_connections(kind="inet"):  # one scan of the system's socket tables
        if connection.status == psutil.CONN_LISTEN and connection.pid in tree:
            try:
                found.add((tree[connection.pid].name(), connection.laddr.ip, connection.pid))
            except psutil.Error:
                pass
    return found


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """`python -m sparsedist.launch.train` with stdout piped: (run_dir, printed output, listened addresses)."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    command = [sys.executable, "-m", "sparsedist.launch.train", "--config", "smoke"]
    for override in overrides(run_dir, data_root):
        command += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()))
    reader.start()
    sockets: set[tuple[str, str, int]] = set()
    while process.poll() is None:
        sockets |= listening_sockets(psutil.Process(process.pid))
        time.sleep(1.0)
    reader.join()
    assert process.returncode == 0, output[0][-5000:]
    return run_dir, output[0], sockets


@pytest.fixture(scope="module")
def cluster(reference):  # after the reference run: one embedded cluster at a time on 2 cores
    with ray_session(ScalingConfig(num_workers=2)):
        yield


def history(run_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def final_state(run_dir: str) -> dict:
    return load_checkpoint(os.path.join(run_dir, f"epoch_{EPOCHS - 1:05d}"))


def read_pid(run_dir: str, rank: int) -> int:
    with open(os.path.join(run_dir, "pids", f"rank{rank}.pid")) as handle:
        return int(handle.read().split()[1])


def test_run_directory_holds_config_history_tensorboard_checkpoints_and_summary(reference):
    run_dir = reference[0]
    cfg = smoke(run_dir, "unused")
    with open(os.path.join(run_dir, CONFIG_FILE)) as handle:
        stored = yaml.safe_load(handle)
    assert stored["run"]["run_dir"] == run_dir and stored["train"]["epochs"] == EPOCHS
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(EPOCHS))
    # Ray kept the newest run.checkpoints_to_keep registered checkpoints; best/ holds the selected epoch.
    kept = sorted(n for n in os.listdir(run_dir) if n.startswith("epoch_"))
    assert kept == [f"epoch_{e:05d}" for e in range(EPOCHS - cfg.run.checkpoints_to_keep, EPOCHS)]
    with open(os.path.join(run_dir, "summary.json")) as handle:
        summary = json.load(handle)
    assert load_checkpoint(os.path.join(run_dir, "best"))["epoch"] == summary["selected"]["epoch"]
    assert {k: v for k, v in summary.items() if k not in ("run_dir", "wall_time_s", "attempts", "provenance")} == summarize(
        records, select_keep_ratio=cfg.eval.select_keep_ratio)
    provenance = summary["provenance"]
    assert (provenance["world_size"], provenance["nodes"], provenance["device"]) == (2, 1, "cpu")
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["versions"]["ray"]
    assert provenance["cuda"] == torch.version.cuda  # the build's CUDA, on a CPU device too
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the workers import the package from here
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance["commit"] in (head, head + "-dirty")
    assert summary["attempts"] == 1
    assert_events_match_jsonl(Path(run_dir) / "tensorboard", records)
    accumulator = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert "summary/selected_test/keep_1.00" in accumulator.Tags()["scalars"]


def test_command_prints_the_regime_table_and_tensorboard_command_and_no_progress_when_piped(reference):
    run_dir, output, _ = reference
    assert "keep  final val  final test" in output
    assert f"tensorboard --logdir {run_dir}/tensorboard --host 127.0.0.1" in output
    assert "\x1b[2K" not in output
    # Piped (as under `ray job logs`): rank 0's start banner and one line per epoch, without Ray Train's
    # per-report chatter.
    assert f"sparsedist run: {run_dir}" in output and "workers: 2 on 1 node(s), device cpu" in output
    epoch_lines = [line for line in output.splitlines() if f"/{EPOCHS}  step " in line]
    assert len(epoch_lines) == EPOCHS and all(" ETA " in line and "test 1.00:" in line and " loss " in line
                                              for line in epoch_lines), epoch_lines
    assert "Reporting training result" not in output


def test_embedded_cluster_services_listen_only_on_loopback(reference):
    run_dir, _, sockets = reference
    assert any(name == "gcs_server" for name, _, _ in sockets), "Ray's services were not sampled"
    exposed = {(name, ip, pid) for name, ip, pid in sockets if ip not in LOOPBACK}
    # The one exception is not Ray's: torch.distributed's rendezvous store (rank 0's TCPStore) binds
    # every interface and offers no option to do otherwise; it lives only while the workers train. The
    # worker is told by its pid: its process title follows the task it runs (ray::RayTrainWorker...,
    # ray::execute...).
    assert {pid for _, _, pid in exposed} <= {read_pid(run_dir, 0)}, exposed


def kill_rank_in_epochs(run_dir: str, epochs: list[int], rank: int, killed: list[int]) -> None:
    """SIGKILL `rank` once a step of each of `epochs` shows in metrics.jsonl and the previous epoch's
    checkpoint is complete in the run directory (so the restart must resume from it, whether Ray registered
    it or not), each time in a new attempt."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    pending = list(epochs)
    while pending and time.monotonic() < deadline:
        pid = read_pid(run_dir, rank) if os.path.exists(os.path.join(run_dir, "pids", f"rank{rank}.pid")) else None
        if pid is not None and pid not in killed and os.path.exists(path) and os.path.isfile(
                os.path.join(run_dir, checkpoint_name(pending[0] - 1), "COMPLETE")) and any(
                r["kind"] == "step" and r["epoch"] >= pending[0] for r in read_jsonl(path)):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            pending.pop(0)
        time.sleep(0.05)


def assert_same_training(run_dir: str, reference_dir: str) -> None:
    """Bitwise: final parameters, controller and sparsity state, and every logged value but timings."""
    state, expected = final_state(run_dir), final_state(reference_dir)
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert state["controller"] == expected["controller"]
    assert state["sparsity"] == expected["sparsity"]
    assert state["step"] == expected["step"]
    assert history(run_dir) == history(reference_dir)


def test_killed_workers_restart_then_resume_and_reproduce_the_uninterrupted_run_bitwise(
        reference, cluster, data_root, tmp_path):
    # One run, three attempts (kept in one test: each worker-group start costs ~15 s on 2 cores):
    # kill 1 in epoch 1 -> Ray restarts from the latest registered checkpoint (run.max_failures=1);
    # kill 2 in epoch 2 -> failures exhausted, the launch fails; `--resume` relaunches and finishes.
    cfg = smoke(tmp_path / "run", data_root, "run.max_failures=1")
    killed: list[int] = []
    killer = threading.Thread(target=kill_rank_in_epochs, args=(cfg.run.run_dir, [1, 2], 1, killed))
    killer.start()
    try:
        with pytest.raises(LaunchError, match="--resume"):
            run_training(cfg)
    finally:
        killer.join()
    assert len(killed) == 2, "the run finished before both kills"
    assert not os.path.exists(os.path.join(cfg.run.run_dir, "summary.json"))
    with pytest.raises(RunDirError, match="--resume to continue it"):
        run_training(cfg)
    summary = run_training(cfg, resume=True)
    assert summary["epochs_completed"] == EPOCHS
    assert read_pid(cfg.run.run_dir, 1) not in killed
    # Ray's restart and the --resume relaunch both began past epoch 0, from a checkpoint (layer scope here;
    # test_hosts restarts a network-scope run after whole hosts are lost).
    starts = [attempt["start_epoch"] for attempt in read_jsonl(os.path.join(cfg.run.run_dir, "attempts.jsonl"))]
    assert len(starts) == 3 and starts[0] == 0 and all(start > 0 for start in starts[1:]), starts
    assert summary["attempts"] == 3
    assert_same_training(cfg.run.run_dir, reference[0])
    # TensorBoard shows the one history metrics.jsonl keeps, not the abandoned attempts' redone steps.
    assert_events_match_jsonl(Path(cfg.run.run_dir) / "tensorboard", read_jsonl(os.path.join(cfg.run.run_dir, "metrics.jsonl")))


def test_more_workers_than_the_cluster_has_fails_fast_with_the_shortfall(cluster, data_root, tmp_path):
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"needs 8 CPU \(the cluster has \d+\)"):
        run_training(smoke(tmp_path / "run", data_root, "scaling.num_workers=8"))
    assert time.monotonic() - started < 30


def test_a_nan_streak_ends_the_run_at_once_without_ray_retries(cluster, data_root, tmp_path):
    # run.max_failures=3 would let Ray Train replay the same NaN streak three more times.
    cfg = smoke(tmp_path / "run", data_root, "optim.lr=1e30", "optim.clip_grad_norm=null",
                "train.max_nonfinite_steps=2", "run.max_failures=3")
    with pytest.raises(LaunchError, match=r"not retried.*NonFiniteLossError: 2 consecutive steps"):
        run_training(cfg)
    assert len(read_jsonl(os.path.join(cfg.run.run_dir, "attempts.jsonl"))) == 1
    assert not os.path.exists(os.path.join(cfg.run.run_dir, "summary.json"))
