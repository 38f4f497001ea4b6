"""Object storage against a real S3 API (moto's server on 127.0.0.1), reached through AWS_* variables as
users reach theirs: locations, the run directory and its mirror, prepared data in a bucket, and the
clear errors of bad locations. Ray-free; the Ray runs on S3 are in test_hosts."""

from __future__ import annotations

import argparse
import re
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest

from sparsedist import storage
from sparsedist.cli import main as cli
from sparsedist.config import load_config
from sparsedist.data import DataUnavailableError, prepare
from sparsedist.launch.train import add_train_arguments, config_from_args, main
from sparsedist.launch.tune import SweepError, run_sweep, sweep_spec
from sparsedist.rundir import RunDirError, RunMirror, check_run_dir, prepare_run_dir
from sparsedist.train.checkpoint import MARKER_FILE, load_checkpoint, save_checkpoint
from tests import gcs, s3


@dataclass(frozen=True)
class Bucket:
    """A new bucket in one of the local object stores: its locations, and its keys as the store lists them."""
    scheme: str
    name: str
    query: str  # the endpoint, where the store is reached through the location's query
    list_keys: Callable[[str, str], list[str]]

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{self.name}/{path}{self.query}"

    def keys(self, prefix: str = "") -> list[str]:
        return self.list_keys(self.name, prefix)


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3.s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def gcs_endpoint():
    with gcs.gcs_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")  # reached through AWS_ENDPOINT_URL
        return Bucket("s3", s3.new_bucket(), "", s3.list_keys)
    endpoint = request.getfixturevalue("gcs_endpoint")
    return Bucket("gs", gcs.new_bucket(endpoint), f"?endpoint_override={endpoint}&scheme=http",
                  partial(gcs.list_keys, endpoint))


def test_uri_locations_keep_their_scheme_and_options():
    uri = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "best", "state.pt") == "s3://bucket/runs/x/best/state.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent_and_name(uri) == ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", "x")
    cfg = load_config("smoke", [f"run.run_dir={uri}", "data.root=gs://data/root", "data.source=relative/file"])
    assert (cfg.run.run_dir, cfg.data.root) == (uri, "gs://data/root")
    assert cfg.data.source == os.path.abspath("relative/file")


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_clear_error_before_any_worker(s3_endpoint, capsys):
    for run_dir, reason in [("s3://no-such-bucket/runs/x", "NoSuchBucket|bucket does not exist"),
                            ("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http", "Could not connect")]:
        assert main(["--config", "smoke", "--run-dir", run_dir]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: cannot write to {run_dir}") and "Check that the bucket exists" in error
        assert re.search(reason, error), error


def test_a_gcs_location_without_its_bucket_or_credentials_is_one_clear_error_not_a_wait(gcs_endpoint, capsys,
                                                                                         monkeypatch, tmp_path):
    options = f"?endpoint_override={gcs_endpoint}&scheme=http"
    assert main(["--config", "smoke", "--run-dir", f"gs://no-such-bucket/runs/x{options}"]) == 2
    assert re.search("cannot write to gs://no-such-bucket/runs/x.*NOT_FOUND.*Check that the bucket exists",
                     capsys.readouterr().err)
    # No credentials anywhere: Google's default chain ends at the metadata server, refused here at once.
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    for gcloud_home in ("HOME", "CLOUDSDK_CONFIG"):  # nor a gcloud login's application default credentials
        monkeypatch.setenv(gcloud_home, str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_ROOT", "127.0.0.1:1")
    monkeypatch.setattr(storage, "GCS_PROBE_RETRY_S", 2)  # the mechanism, not the wait: 2 s for the shipped 10
    started = time.monotonic()
    assert main(["--config", "smoke", "--run-dir", f"gs://{gcs.new_bucket(gcs_endpoint)}/runs/x{options}"]) == 2
    error = capsys.readouterr().err
    assert "OAuth2 access token" in error and "GOOGLE_APPLICATION_CREDENTIALS for gs://" in error
    assert time.monotonic() - started < 4 * storage.GCS_PROBE_RETRY_S  # not Google's default 15 minutes
    started = time.monotonic()  # and readers: eval (export and report check the same way)
    assert cli(["eval", f"gs://{gcs.new_bucket(gcs_endpoint)}/runs/x{options}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read gs://") and "GOOGLE_APPLICATION_CREDENTIALS for gs://" in error
    assert time.monotonic() - started < 4 * storage.GCS_PROBE_RETRY_S


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
    run_dir = bucket.uri("runs/a")
    cfg = prepare_run_dir(load_config("smoke", [f"run.run_dir={run_dir}"]))
    assert cfg.run.run_dir == run_dir and bucket.keys() == ["runs/a/config.yaml"]
    with pytest.raises(RunDirError, match="already holds a run"):
        check_run_dir(cfg)
    resumed = config_from_args(parse("--resume", "--run-dir", run_dir))  # its config comes from the bucket
    assert resumed == cfg and check_run_dir(resumed, resume=True) == cfg
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), b"{}\n")
    prepare_run_dir(cfg, overwrite=True)
    assert bucket.keys() == ["runs/a/config.yaml"]


def test_a_run_in_a_bucket_is_evaluated_from_a_copy_of_the_one_checkpoint_it_reads(bucket, tmp_path):
    from sparsedist.report.evaluate import resolve_checkpoint

    run_dir = bucket.uri("runs/a")
    for epoch in range(3):
        save_checkpoint({"epoch": epoch}, str(tmp_path / f"epoch_{epoch:05d}"))
    (tmp_path / "epoch_00002" / MARKER_FILE).unlink()  # a save cut short: not complete, not chosen
    storage.upload(str(tmp_path), run_dir)
    storage.upload(str(tmp_path / "epoch_00000"), storage.join(run_dir, "start"))  # a PBT donor's state
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), b"{}\n")
    newest = resolve_checkpoint(run_dir)
    assert os.path.basename(newest) == "epoch_00001" and load_checkpoint(newest)["epoch"] == 1
    assert os.listdir(os.path.dirname(newest)) == ["epoch_00001"]  # the one checkpoint, nothing beside it
    storage.upload(str(tmp_path / "epoch_00000"), storage.join(run_dir, "best"))
    best = resolve_checkpoint(run_dir)
    assert os.path.basename(best) == "best" and os.listdir(os.path.dirname(best)) == ["best"]
    given = resolve_checkpoint(storage.join(run_dir, "epoch_00000"))
    assert load_checkpoint(given)["epoch"] == 0 and os.listdir(os.path.dirname(given)) == ["epoch_00000"]


def test_a_sweep_directory_in_a_bucket_lists_its_trials(bucket):
    from sparsedist.report.sweep import read_trials, write_trial_file

    sweep_dir = bucket.uri("sweeps/s")
    for trial_id, seed in (("t_00000", 0), ("t_00001", 1)):
        run_dir = storage.join(sweep_dir, "trials", trial_id)
        prepare_run_dir(load_config("smoke", [f"run.run_dir={run_dir}"]))
        write_trial_file(run_dir, trial_id, {"run.seed": seed})
    assert storage.list_dir(sweep_dir) == ["trials"]
    assert [(t.trial_id, t.params) for t in read_trials(sweep_dir)] == [("t_00000", {"run.seed": 0}),
                                                                        ("t_00001", {"run.seed": 1})]


def test_the_mirror_publishes_changed_rank0_files_and_a_restarted_attempt_restores_them(bucket):
    run_dir = bucket.uri("runs/m")
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
    assert bucket.keys() == ["runs/m/best/COMPLETE", "runs/m/best/state.pt", "runs/m/metrics.jsonl",
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
    assert not os.path.exists(mirror.path("best")) and "runs/m/best/state.pt" not in bucket.keys()
    shutil.rmtree(mirror.local)


def test_a_relative_sweep_directory_is_refused_while_attached_to_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # refused before any connection is tried
    with pytest.raises(SweepError, match="is relative .* while attached to a cluster"):
        run_sweep(sweep_spec("smoke", "tune_spaces/adaptive_reset.yaml"), "sweeps/x")


def test_data_prepared_into_a_bucket_is_fetched_into_node_caches_and_verified(bucket):
    data = load_config("smoke", [f"data.root={bucket.uri('data')}"]).data
    logged: list[str] = []
    built = prepare(data, log=logged.append)
    assert any(line.startswith("preparing synthetic") for line in logged)
    remote = sorted(key.rsplit("/", 1)[1] for key in bucket.keys("data/"))
    assert remote == ["manifest.json", "test.beton", "train.beton", "val.beton"]
    sizes = {path.name: path.stat().st_size for path in built.directory.glob("*.beton")}

    shutil.rmtree(built.directory)  # another node: an empty cache
    logged.clear()
    fetched = prepare(data, log=logged.append)
    assert fetched.directory == built.directory and logged[0].startswith(f"fetching {bucket.scheme}://{bucket.name}/data/synthetic-")
    assert {path.name: path.stat().st_size for path in fetched.directory.glob("*.beton")} == sizes

    storage.write_bytes(storage.join(data.root, built.directory.name, "train.beton"), b"damaged")
    shutil.rmtree(built.directory)
    with pytest.raises(DataUnavailableError, match="do not verify"):
        prepare(data, log=logged.append)
    shutil.rmtree(storage.working_dir(data.root, "data"))
