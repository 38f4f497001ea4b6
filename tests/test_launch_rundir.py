"""Run-directory rules: a new run starts, an existing one is resumed or replaced only when asked."""

from __future__ import annotations

import os

import pytest
import yaml

from sparsedist.config import load_config
from sparsedist.rundir import CONFIG_FILE, SUMMARY_FILE, RunDirError, prepare_run_dir


def smoke(run_dir, *overrides):
    return load_config("smoke", [f"run.run_dir={run_dir}", *overrides])


def test_new_run_writes_the_resolved_config_with_an_absolute_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = prepare_run_dir(load_config("smoke"))  # run_dir unset: ./runs/<name>
    expected = str(tmp_path / "runs" / "smoke")
    assert cfg.run.run_dir == expected
    with open(os.path.join(expected, CONFIG_FILE)) as handle:
        assert yaml.safe_load(handle) == cfg.to_dict()


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    prepare_run_dir(smoke(tmp_path / "run"))
    with pytest.raises(RunDirError, match="--resume to continue it or --overwrite"):
        prepare_run_dir(smoke(tmp_path / "run"))


def test_overwrite_replaces_a_run(tmp_path):
    prepare_run_dir(smoke(tmp_path / "run"))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    prepare_run_dir(smoke(tmp_path / "run", "train.epochs=5"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "run")) == [CONFIG_FILE]
    assert yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["train"]["epochs"] == 5


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a sparsedist run directory"):
        prepare_run_dir(smoke(tmp_path), overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_refuses_changed_training_fields_and_names_each(tmp_path):
    prepare_run_dir(smoke(tmp_path / "run"))
    with pytest.raises(RunDirError) as error:
        prepare_run_dir(smoke(tmp_path / "run", "train.epochs=3", "controller.tighten_pct=0.2"), resume=True)
    message = str(error.value)
    assert "train.epochs: 2 -> 3" in message and "controller.tighten_pct: 0.1 -> 0.2" in message
    assert "scaling" not in message


def test_resume_accepts_changed_resources_and_bookkeeping(tmp_path):
    prepare_run_dir(smoke(tmp_path / "run"))
    cfg = prepare_run_dir(smoke(tmp_path / "run", "scaling.num_workers=2", "run.max_failures=3",
                                "data.loader_workers=2"), resume=True)
    assert yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["scaling"]["num_workers"] == 2
    assert cfg.run.max_failures == 3


def test_resume_refuses_a_completed_run_and_a_missing_one(tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        prepare_run_dir(smoke(tmp_path / "run"), resume=True)
    prepare_run_dir(smoke(tmp_path / "run"))
    (tmp_path / "run" / SUMMARY_FILE).write_text("{}")
    with pytest.raises(RunDirError, match="already completed"):
        prepare_run_dir(smoke(tmp_path / "run"), resume=True)
    with pytest.raises(RunDirError, match="exclude each other"):
        prepare_run_dir(smoke(tmp_path / "run"), resume=True, overwrite=True)
