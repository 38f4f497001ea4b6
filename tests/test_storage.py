"""Object storage against a real S3 API (moto's server on 127.0.0.1), reached through AWS_* variables as
users reach theirs: locations, the run directory and its mirror, prepared data in a bucket, and the
clear errors of bad locations. Ray-free; the Ray runs on S3 are in test_multinode."""

from __future__ import annotations

import argparse
import re
import os
import shutil

import pytest

from sparsedist import storage
from sparsedist.config import load_config
from sparsedist.data import DataUnavailableError, prepare
from sparsedist.launch.train import add_train_arguments, config_from_args, main
from sparsedist.launch.tune import SweepError, run_sweep, sweep_spec
from sparsedist.rundir import RunDirError, RunMirror, check_run_dir, prepare_run_dir
from sparsedist.train.checkpoint import MARKER_FILE, load_checkpoint, save_checkpoint
from tests.s3 import list_keys, new_bucket, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3):
    return new_bucket()


def test_uri_locations_keep_their_scheme_and_options():
    uri = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "best", "state.pt") == "s3://bucket/runs/x/best/state.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent_and_name(uri) == ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "x")
    cfg = load_config("smoke", [f"run.run_dir={uri}", "data.root=gs://data/root", "data.source=relative/file"])
    assert (cfg.run.run_dir, cfg.data.root) == (uri, "gs://data/root")
    assert cfg.data.source == os.path.abspath("relative/file")


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_clear_error_before_any_worker(s3, capsys):
    for run_dir, reason in [("s3://no-such-bucket/runs/x", "NoSuchBucket|bucket does not exist"),
                            ("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http", "Could not connect")]:
        assert main(["--config", "smoke", "--run-dir", run_dir]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: cannot write to {run_dir}") and "Check that the bucket exists" in error
        assert re.search(reason, error), error


def test_a_relative_run_dir_is_refused_while_attached_to_a_cluster(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # refused before any connection is tried
    assert main(["--config", "smoke", "--run-dir", "runs/x"]) == 2
    assert "is relative while attached to a cluster" in capsys.readouterr().err
    assert main(["--config", "smoke"]) == 2
    assert "is unset while attached to a cluster" in capsys.readouterr().err


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_a_run_directory_in_a_bucket_is_created_refused_resumed_and_overwritten(bucket):
    run_dir = f"s3://{bucket}/runs/a"
    cfg = prepare_run_dir(load_config("smoke", [f"run.run_dir={run_dir}"]))
    assert cfg.run.run_dir == run_dir and list_keys(bucket) == ["runs/a/config.yaml"]
    with pytest.raises(RunDirError, match="already holds a run"):
        check_run_dir(cfg)
    resumed = config_from_args(parse("--resume", "--run-dir", run_dir))  # its config comes from the bucket
    assert resumed == cfg and check_run_dir(resumed, resume=True) == cfg
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), b"{}\n")
    prepare_run_dir(cfg, overwrite=True)
    assert list_keys(bucket) == ["runs/a/config.yaml"]


def test_a_run_in_a_bucket_is_evaluated_from_a_copy_of_the_one_checkpoint_it_reads(bucket, tmp_path):
    from sparsedist.report.evaluate import resolve_checkpoint

    run_dir = f"s3://{bucket}/runs/a"
    for epoch in range(3):
        save_checkpoint({"epoch": epoch}, str(tmp_path / f"epoch_{epoch:05d}"))
    (tmp_path / "epoch_00002" / MARKER_FILE).unlink()  # a save cut short: not complete, not chosen
    storage.upload(str(tmp_path), run_dir)
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), b"{}\n")
    newest = resolve_checkpoint(run_dir)
    assert os.path.basename(newest) == "epoch_00001" and load_checkpoint(newest)["epoch"] == 1
    assert sorted(os.listdir(os.path.dirname(newest))) == ["epoch_00001"]
    storage.upload(str(tmp_path / "epoch_00000"), storage.join(run_dir, "best"))
    best = resolve_checkpoint(run_dir)
    assert os.path.basename(best) == "best" and sorted(os.listdir(os.path.dirname(best))) == ["best"]


def test_the_mirror_publishes_changed_rank0_files_and_a_restarted_attempt_restores_them(bucket):
    run_dir = f"s3://{bucket}/runs/m"
    mirror = RunMirror(run_dir)
    shutil.rmtree(mirror.local)
    os.makedirs(os.path.join(mirror.local, "tensorboard"))
    os.makedirs(os.path.join(mirror.local, "pids"))
    save_checkpoint({"epoch": 3}, mirror.path("best"))
    files = {"metrics.jsonl": b'{"kind": "epoch"}\n', "tensorboard/events.out.tfevents.1": b"\x00" * 100,
             "pids/rank0.pid": b"host 1 node"}
    for name, content in files.items():
        with open(os.path.join(mirror.local, name), "wb") as handle:
            handle.write(content)
    best_bytes = sum(os.path.getsize(mirror.path(f"best/{name}")) for name in ("state.pt", "COMPLETE"))
    assert mirror.publish() == best_bytes + len(files["metrics.jsonl"]) + 100
    assert list_keys(bucket) == ["runs/m/best/COMPLETE", "runs/m/best/state.pt", "runs/m/metrics.jsonl",
                                 "runs/m/tensorboard/events.out.tfevents.1"]  # pids/ stays on the node
    with open(mirror.path("metrics.jsonl"), "ab") as handle:
        handle.write(b'{"kind": "step"}\n')
    assert mirror.publish() == len(files["metrics.jsonl"]) + 17  # only what changed goes up again

    # Another attempt on this node: stale local files give way to what the run directory holds.
    with open(os.path.join(mirror.local, "tensorboard", "events.out.tfevents.2"), "wb") as handle:
        handle.write(b"stale")
    shutil.rmtree(mirror.path("best"))
    mirror.restore()
    assert load_checkpoint(mirror.path("best"))["epoch"] == 3
    assert os.listdir(os.path.join(mirror.local, "tensorboard")) == ["events.out.tfevents.1"]

    # A publish interrupted between best/'s two uploads leaves it without its marker: the next attempt drops it.
    storage.delete_file(storage.join(run_dir, "best", "COMPLETE"))
    RunMirror(run_dir).restore()
    assert not os.path.exists(mirror.path("best")) and "runs/m/best/state.pt" not in list_keys(bucket)
    shutil.rmtree(mirror.local)


def test_a_relative_sweep_directory_is_refused_while_attached_to_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # refused before any connection is tried
    with pytest.raises(SweepError, match="is relative .* while attached to a cluster"):
        run_sweep(sweep_spec("smoke", "tune_spaces/adaptive_reset.yaml"), "sweeps/x")


def test_data_prepared_into_a_bucket_is_fetched_into_node_caches_and_verified(bucket):
    data = load_config("smoke", [f"data.root=s3://{bucket}/data"]).data
    logged: list[str] = []
    built = prepare(data, log=logged.append)
    assert any(line.startswith("preparing synthetic") for line in logged)
    remote = sorted(key.rsplit("/", 1)[1] for key in list_keys(bucket, "data/"))
    assert remote == ["manifest.json", "test.beton", "train.beton", "val.beton"]
    sizes = {path.name: path.stat().st_size for path in built.directory.glob("*.beton")}

    shutil.rmtree(built.directory)  # another node: an empty cache
    logged.clear()
    fetched = prepare(data, log=logged.append)
    assert fetched.directory == built.directory and logged[0].startswith(f"fetching s3://{bucket}/data/synthetic-")
    assert {path.name: path.stat().st_size for path in fetched.directory.glob("*.beton")} == sizes

    storage.write_bytes(storage.join(data.root, built.directory.name, "train.beton"), b"damaged")
    shutil.rmtree(built.directory)
    with pytest.raises(DataUnavailableError, match="do not verify"):
        prepare(data, log=logged.append)
    shutil.rmtree(storage.working_dir(data.root, "data"))
