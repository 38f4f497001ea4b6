"""Sweep tables, statistics, HParams and report figures, on real training runs (in-process loop, tensor data).

The sweep directory is laid out as `run_sweep` lays it out: real run directories written by the loop's
own sinks, trial.json written by the trial driver's function. Expected numbers are computed here
independently from the metrics.jsonl records, with scipy for the statistics.
"""

import csv
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread
from scipy import stats as scipy_stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from sparsedist.config import apply_overrides, load_source, validate
from sparsedist.rundir import METRICS_FILE, prepare_run_dir
from sparsedist.launch.space import parse_space
from sparsedist.logging import JsonLinesSink
from sparsedist.report.page import ReportError, write_report
from sparsedist.report.sweep import (CSV_FILE, SUMMARY_MD, SWEEP_FILE, TENSORBOARD_DIR, TRIALS_DIR, write_sweep_results,
                                     write_trial_file)
from sparsedist.train.loop import train
from tests.helpers import loaders_for

METRIC = "eval/val/accuracy/keep_1.00"
SPACE = parse_space({
    "controller": {"grid": {"dense": {"strategy": "dense"}, "fixed": {"strategy": "fixed", "keep_ratio": 0.2}}},
    "optim.lr": {"grid": [0.05, 0.1]},
    "run.seed": {"grid": [0, 1]},
})
BASE = apply_overrides(load_source("smoke"), ["train.batch_size=32", "train.epochs=3", "eval.keep_ratios=[1.0, 0.2]"])


def train_trial(sweep_dir, trial_id, sampled, stop_after_epoch=None):
    """A trial's run directory as the launch writes it, trained by the real loop in this process."""
    run_dir = os.path.join(sweep_dir, TRIALS_DIR, trial_id)
    cfg = prepare_run_dir(validate(apply_overrides(BASE, {**SPACE.overrides(sampled), "run.run_dir": run_dir})))
    write_trial_file(run_dir, trial_id, sampled)
    sink = JsonLinesSink(os.path.join(run_dir, METRICS_FILE))

    def stop(end):
        if end.epoch == stop_after_epoch:
            raise KeyboardInterrupt  # as a scheduler stopping the trial

    try:
        train(cfg, loaders_for(cfg), device=torch.device("cpu"), sinks=[sink], on_epoch_end=stop)
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
    return run_dir


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep"))
    with open(os.path.join(root, SWEEP_FILE), "w") as handle:
        yaml.safe_dump({"metric": METRIC, "mode": "max"}, handle)
    combos = [dict(zip(SPACE.paths, values)) for values in itertools.product(*(d.options for d in SPACE.dimensions))]
    for index, sampled in enumerate(combos):
        train_trial(root, f"t{index:02d}", sampled)
    train_trial(root, "t08", combos[0], stop_after_epoch=0)
    failed = train_trial(root, "t09", combos[1], stop_after_epoch=0)
    write_trial_file(failed, "t09", combos[1], error="RuntimeError: worker died")
    write_sweep_results(root)
    return root


def independent_selection(run_dir):
    """(selected epoch record, final evaluated record), straight from metrics.jsonl."""
    with open(os.path.join(run_dir, METRICS_FILE)) as handle:
        epochs = [r for r in map(json.loads, handle) if r["kind"] == "epoch"]
    best = max(r["eval"]["val"]["1.00"] for r in epochs)
    return next(r for r in epochs if r["eval"]["val"]["1.00"] == best), epochs[-1]


def trial_params(sweep_dir, trial_id):
    with open(os.path.join(sweep_dir, TRIALS_DIR, trial_id, "trial.json")) as handle:
        return json.load(handle)["params"]


def group_values(sweep_dir, controller, lr, key, trial_ids=tuple(f"t{i:02d}" for i in range(8))):
    values = []
    for trial_id in trial_ids:
        params = trial_params(sweep_dir, trial_id)
        if params["controller"] == controller and params["optim.lr"] == lr:
            values.append(independent_selection(os.path.join(sweep_dir, TRIALS_DIR, trial_id))[0]["eval"]["test"][key])
    return values


def test_sweep_csv_has_one_row_per_trial_with_selected_and_final_accuracy(sweep_dir):
    with open(os.path.join(sweep_dir, CSV_FILE)) as handle:
        rows = {row["trial_id"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 10
    assert {rows[t]["status"] for t in rows} == {"completed", "stopped", "error"}
    assert [rows[t]["status"] for t in ("t08", "t09")] == ["stopped", "error"]
    assert rows["t09"]["error"] == "RuntimeError: worker died"
    for trial_id in (f"t{i:02d}" for i in range(8)):
        row, params = rows[trial_id], trial_params(sweep_dir, trial_id)
        assert (row["status"], row["epochs_completed"]) == ("completed", "3")
        assert (row["controller"], float(row["optim.lr"]), int(row["run.seed"])) == (
            params["controller"], params["optim.lr"], params["run.seed"])
        selected, final = independent_selection(os.path.join(sweep_dir, TRIALS_DIR, trial_id))
        assert int(row["selected_epoch"]) == selected["epoch"]
        assert float(row[f"best {METRIC}"]) == selected["eval"]["val"]["1.00"]
        for key in ("1.00", "0.20"):
            assert float(row[f"selected_test/keep_{key}"]) == selected["eval"]["test"][key]
            assert float(row[f"selected_val/keep_{key}"]) == selected["eval"]["val"][key]
            assert float(row[f"final_val/keep_{key}"]) == final["eval"]["val"][key]
            assert float(row[f"final_test/keep_{key}"]) == final["eval"]["test"][key]


def summary_row(sweep_dir, keep, label):
    text = open(os.path.join(sweep_dir, SUMMARY_MD)).read()
    section = text.split(f"### keep ratio {keep}\n")[1].split("###")[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def welch_p(sweep_dir, lr, keep):
    p_value = scipy_stats.ttest_ind(group_values(sweep_dir, "fixed", lr, keep), group_values(sweep_dir, "dense", lr, keep),
                                    equal_var=False).pvalue
    return float(p_value)


def holm_of_two(p_values):
    """Holm for a family of two, by hand: the smaller p doubled (at most 1), the larger kept unless below that."""
    small, large = sorted(p_values)
    return {small: min(1.0, 2 * small), large: max(min(1.0, 2 * small), large)}


@pytest.mark.parametrize("keep", ["1.00", "0.20"])
def test_summary_statistics_match_scipy_against_the_dense_group_of_the_same_lr(sweep_dir, keep):
    for lr in (0.05, 0.1):
        fixed = group_values(sweep_dir, "fixed", lr, keep)
        n, mean, std, interval, p_value, holm_p = summary_row(sweep_dir, keep, f"controller=fixed, optim.lr={lr}")
        low, high = scipy_stats.t.interval(0.95, 1, loc=np.mean(fixed), scale=scipy_stats.sem(fixed))
        assert (int(n), mean, std) == (2, f"{np.mean(fixed):.4f}", f"{np.std(fixed, ddof=1):.4f}")
        assert interval == f"[{max(low, 0.0):.4f}, {min(high, 1.0):.4f}]"  # accuracy intervals stay inside [0, 1]
        expected_p = welch_p(sweep_dir, lr, keep)
        assert p_value == ("–" if np.isnan(expected_p) else f"{expected_p:.4f}")
        # The family is the group's two keep ratios (1.00 and 0.20).
        family = [welch_p(sweep_dir, lr, key) for key in ("1.00", "0.20")]
        if np.isnan(family).any():
            assert holm_p == ("–" if np.isnan(expected_p) else f"{expected_p:.4f}")
        else:
            assert holm_p == f"{holm_of_two(family)[expected_p]:.4f}"
        assert summary_row(sweep_dir, keep, f"controller=dense, optim.lr={lr}")[-2:] == ["reference", "reference"]


def test_summary_counts_stopped_and_failed_trials_of_each_group(sweep_dir):
    text = open(os.path.join(sweep_dir, SUMMARY_MD)).read()
    section = text.split("## Trials per group\n")[1].split("##")[0]
    assert "| controller=dense, optim.lr=0.05 | 4 | 2 | 1 | 1 |" in section  # t08 stopped, t09 failed
    assert "| controller=fixed, optim.lr=0.1 | 2 | 2 | 0 | 0 |" in section


def test_summary_names_the_best_configuration_and_counts_statuses(sweep_dir):
    text = open(os.path.join(sweep_dir, SUMMARY_MD)).read()
    assert "10 trials: 8 completed, 1 stopped early by the scheduler, 1 failed" in text
    means = {}
    for controller, lr in itertools.product(("dense", "fixed"), (0.05, 0.1)):
        best_vals = []
        for trial_id in (f"t{i:02d}" for i in range(8)):
            params = trial_params(sweep_dir, trial_id)
            if (params["controller"], params["optim.lr"]) == (controller, lr):
                best_vals.append(independent_selection(os.path.join(sweep_dir, TRIALS_DIR, trial_id))[0]["eval"]["val"]["1.00"])
        means[f"controller={controller}, optim.lr={lr}"] = np.mean(best_vals)
    best_label = max(means, key=means.get)
    assert re.search(rf"\*\*{re.escape(best_label)}\*\* \(mean {means[best_label]:.4f}, n = 2", text)


def test_hparams_view_holds_each_trials_sampled_values_and_results(sweep_dir):
    log_dirs = sorted(os.listdir(os.path.join(sweep_dir, TENSORBOARD_DIR)))
    assert log_dirs == [f"t{i:02d}" for i in range(10)]
    for trial_id in ("t00", "t05", "t09"):
        events = EventAccumulator(os.path.join(sweep_dir, TENSORBOARD_DIR, trial_id), size_guidance={"scalars": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = next(plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()
                     if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
        hparams = start.session_start_info.hparams
        params = trial_params(sweep_dir, trial_id)
        assert hparams["controller"].string_value == params["controller"]
        assert hparams["optim.lr"].number_value == params["optim.lr"]
        assert hparams["run.seed"].number_value == params["run.seed"]
        selected, _ = independent_selection(os.path.join(sweep_dir, TRIALS_DIR, trial_id))
        scalar = events.Scalars("sweep/selected_test/keep_1.00")[0].value
        assert scalar == pytest.approx(selected["eval"]["test"]["1.00"], abs=1e-6)


def figure_is_drawn(path):
    image = imread(path)
    return image.shape[0] > 200 and image.shape[1] > 300 and float(image[..., :3].std()) > 0.05


def test_report_draws_figures_and_table_for_a_sweep_and_a_run(sweep_dir, tmp_path):
    single_run = os.path.join(sweep_dir, TRIALS_DIR, "t05")
    page = write_report([sweep_dir, single_run], str(tmp_path / "report"))
    for name in ("accuracy_vs_keep.png", "keep_trajectory.png", "train_vs_val.png"):
        assert figure_is_drawn(tmp_path / "report" / name), name
    text = open(page).read()
    dense = group_values(sweep_dir, "dense", 0.1, "1.00")
    low, high = scipy_stats.t.interval(0.95, 1, loc=np.mean(dense), scale=scipy_stats.sem(dense))
    assert f"controller=dense, optim.lr=0.1 | 2 | {np.mean(dense):.4f} [{max(low, 0):.4f}, {min(high, 1):.4f}] |" in text
    assert f"| t05 | 1 | {independent_selection(single_run)[0]['eval']['test']['1.00']:.4f} |" in text
    assert "![Accuracy vs keep ratio](accuracy_vs_keep.png)" in text


def test_report_refuses_a_directory_that_is_neither_run_nor_sweep(tmp_path):
    with pytest.raises(ReportError, match="neither a run directory"):
        write_report([str(tmp_path)], str(tmp_path / "out"))


def test_checkpoint_path_resolves_run_directories_to_best_then_newest(tmp_path):
    from sparsedist.report.evaluate import resolve_checkpoint
    from sparsedist.train.checkpoint import CheckpointError, save_checkpoint

    run_dir = tmp_path / "run"
    for name in ("epoch_00000", "epoch_00001"):
        save_checkpoint({"epoch": int(name[-1])}, str(run_dir / name))
    assert resolve_checkpoint(str(run_dir)) == str(run_dir / "epoch_00001")
    save_checkpoint({"epoch": 0}, str(run_dir / "best"))
    assert resolve_checkpoint(str(run_dir)) == str(run_dir / "best")
    assert resolve_checkpoint(str(run_dir / "epoch_00000")) == str(run_dir / "epoch_00000")
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a run directory"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_regime_table_shows_calibrated_threshold_in_network_scope():
    from sparsedist.report.evaluate import CheckpointEvaluation, regime_text

    cfg = validate(apply_overrides(BASE, ["sparsity.scope=network"]))
    evaluation = CheckpointEvaluation(
        "/runs/x/best", 4, cfg, {"val": {"1.00": 0.8, "0.20": 0.7}, "test": {"1.00": 0.79, "0.20": 0.65}},
        {"0.20": {"threshold": 0.0625, "realized_keep": 0.2012, "iterations": 3, "converged": True}}, weights={})
    lines = regime_text(evaluation).splitlines()
    assert lines[0] == "/runs/x/best (epoch 5, network scope, synthetic)"
    assert lines[1].split() == ["keep", "val", "test", "realized", "keep", "tau"]
    assert lines[3].split() == ["1.00", "0.8000", "0.7900", "1.0000", "0"]
    assert lines[4].split() == ["0.20", "0.7000", "0.6500", "0.2012", "0.0625"]
