"""TensorBoardSink: event files read back with TensorBoard's own readers agree with metrics.jsonl, and the
real `tensorboard` server shows each regime as its own run under shared tags (its HTTP API)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from sparsedist.logging import JsonLinesSink, TensorBoardSink, flatten_epoch, read_jsonl, rewind_jsonl
from tests.distributed import free_port
from tests.servers import local_server

SITES = ("block1.site1", "final")


def step_record(epoch: int, step: int, keep: float, event: str = "hold", skipped: bool = False) -> dict:
    if skipped:
        return {"kind": "step", "epoch": epoch, "step": step, "skipped": True, "loss": None,
                "event": "nonfinite", "keep_ratio": keep, "threshold": None}
    return {"kind": "step", "epoch": epoch, "step": step, "skipped": False, "loss": 2.0 / step,
            "accuracy": 0.1 * epoch + 0.01 * step, "keep_ratio": keep, "threshold": None,
            "realized_keep": keep * 0.9, "event": event, "lr": 0.05,
            "density": {site: keep * (i + 1) / 3 for i, site in enumerate(SITES)}}


REGIMES = ("1.00", "0.50", "0.10")


def epoch_record(epoch: int, step: int, keep: float) -> dict:
    """A held-out-protocol epoch record in layer scope, with the evaluation at the training keep ratio."""
    accuracies = {"1.00": 0.5 + 0.1 * epoch, "0.50": 0.4 + 0.1 * epoch, "0.10": 0.2 + 0.05 * epoch}
    return {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": 1.0 / (epoch + 1),
            "train_accuracy": 0.3 + 0.1 * epoch, "keep_ratio": keep, "threshold": None, "realized_keep": keep * 0.9,
            "events": {"tighten": 2, "hold": 1}, "lr": 0.05, "epoch_time_s": 1.5, "images_per_sec": 640.0,
            "nonfinite_steps": 0, "is_best": True, "best_val_accuracy": accuracies["1.00"], "best_test_accuracy": None,
            "eval": {"val": accuracies, "test": {k: v - 0.01 for k, v in accuracies.items()}},
            "eval_current": {"keep_ratio": keep, "val": 0.45 + 0.1 * epoch, "test": 0.44 + 0.1 * epoch},
            "calibration": {}}


def history(epochs: range, keep: float = 0.8, event: str = "tighten") -> list[dict]:
    records = []
    for epoch in epochs:
        first = epoch * 4 + 1
        records += [step_record(epoch, first, keep), step_record(epoch, first + 1, keep, event=event),
                    step_record(epoch, first + 1, keep, skipped=True), step_record(epoch, first + 3, keep),
                    epoch_record(epoch, first + 3, keep)]
    return records


def write_run(run_dir, records, purge_step=None) -> None:
    sinks = [JsonLinesSink(str(run_dir / "metrics.jsonl")), TensorBoardSink(str(run_dir / "tensorboard"), purge_step)]
    for record in records:
        for sink in sinks:
            sink.write(record)
    for sink in sinks:
        sink.close()


def load_events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def expected_runs(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """run -> tag -> step -> value, as the README documents the layout: per-step and per-epoch training
    scalars in the main run (""), each regime's evaluation in run `keep_<rho>` and the evaluation at the
    training keep ratio in run `keep_training`, under the shared tags `eval/<split>/accuracy` and
    `eval/keep_ratio` (and `eval/calibration/realized_keep` in network scope)."""
    expected: dict[str, dict[str, dict[int, float]]] = {}

    def expect(run, tag, step, value):
        expected.setdefault(run, {}).setdefault(tag, {})[step] = value

    for record in records:
        step = record["step"]
        if record["kind"] == "step":
            if not record["skipped"]:
                for key in ("loss", "accuracy", "keep_ratio", "realized_keep", "lr"):
                    expect("", f"train/{key}", step, record[key])
                for site, density in record["density"].items():
                    expect("", f"sparsity/density/{site}", step, density)
            if record["event"] not in ("hold", "warmup"):
                expect("", f"controller/{record['event']}", step, record["keep_ratio"])
            continue
        for split, accuracies in record["eval"].items():
            for key, accuracy in accuracies.items():
                expect(f"keep_{key}", f"eval/{split}/accuracy", step, accuracy)
                expect(f"keep_{key}", "eval/keep_ratio", step, float(key))
        current = record.get("eval_current") or {}
        for split in ("val", "test"):
            if current.get(split) is not None:
                expect("keep_training", f"eval/{split}/accuracy", step, current[split])
                expect("keep_training", "eval/keep_ratio", step, current["keep_ratio"])
        for key, calibration in record.get("calibration", {}).items():
            expect(f"keep_{key}", "eval/calibration/realized_keep", step, calibration["realized_keep"])
        for split in ("val", "test"):
            if record.get(f"best_{split}_accuracy") is not None:
                expect("", f"eval/{split}/best_accuracy", step, record[f"best_{split}_accuracy"])
        expect("", "epoch/loss", step, record["train_loss"])
        expect("", "epoch/images_per_sec", step, record["images_per_sec"])
        for event, count in record["events"].items():
            expect("", f"controller/events/{event}", step, count)
    return expected


def assert_series_equal(got: dict[int, float], want: dict[int, float], label) -> None:
    assert got.keys() == want.keys(), (label, sorted(got), sorted(want))
    for step, value in want.items():
        assert math.isclose(got[step], value, rel_tol=1e-6), (label, step, got[step], value)


def assert_events_match_jsonl(log_dir: Path, records: list[dict]) -> None:
    """Every value in metrics.jsonl is in the event files of its documented run, under its tag, at its
    global step; no per-regime tag (`eval/<split>/accuracy/keep_<rho>`) is left in the main run."""
    expected = expected_runs(records)
    assert {p.name for p in log_dir.iterdir() if p.is_dir()} == set(expected) - {""}
    for run, tags in expected.items():
        accumulator = load_events(log_dir / run)
        scalar_tags = set(accumulator.Tags()["scalars"])
        assert set(tags) <= scalar_tags, f"{run or 'main run'} misses tags: {sorted(set(tags) - scalar_tags)}"
        if run:
            assert scalar_tags == set(tags), (run, sorted(scalar_tags))
        else:
            assert not [t for t in scalar_tags if re.fullmatch(r"eval/\w+/accuracy(/.*)?", t)], sorted(scalar_tags)
        for tag, values in tags.items():
            assert_series_equal(scalar_series(accumulator, tag), values, (run, tag))


def test_event_files_hold_every_jsonl_value_under_its_run_and_tag(tmp_path):
    write_run(tmp_path, history(range(3)))
    assert_events_match_jsonl(tmp_path / "tensorboard", read_jsonl(str(tmp_path / "metrics.jsonl")))
    assert {p.name for p in (tmp_path / "tensorboard").iterdir() if p.is_dir()} == {
        "keep_1.00", "keep_0.50", "keep_0.10", "keep_training"}


def test_network_scope_paper_protocol_and_epochs_without_evaluation(tmp_path):
    # Network scope: each regime's calibrated realized keep in its run; paper protocol: best test accuracy.
    # The middle epoch did not evaluate: no regime run gets a point there.
    records = history(range(3))
    for record in records:
        if record["kind"] == "epoch":
            record.update(best_val_accuracy=None, best_test_accuracy=record["eval"]["test"]["1.00"],
                          calibration={key: {"threshold": 0.3, "realized_keep": float(key) * 1.02, "iterations": 4,
                                             "converged": True} for key in REGIMES if key != "1.00"})
            record["eval_current"]["val"] = None  # a run without a validation split has no val
            if record["epoch"] == 1:
                record.update(eval={}, eval_current={}, calibration={})
    write_run(tmp_path, records)
    log_dir = tmp_path / "tensorboard"
    assert_events_match_jsonl(log_dir, records)
    training = load_events(log_dir / "keep_training")
    assert "eval/val/accuracy" not in training.Tags()["scalars"]
    assert sorted(scalar_series(training, "eval/test/accuracy")) == [4, 12]
    assert scalar_series(load_events(log_dir / "keep_0.10"), "eval/calibration/realized_keep") == {
        4: pytest.approx(0.102), 12: pytest.approx(0.102)}
    assert "eval/test/best_accuracy" in load_events(log_dir).Tags()["scalars"]


def test_records_of_older_runs_without_the_current_evaluation(tmp_path):
    records = history(range(2))
    for record in records:
        if record["kind"] == "epoch":
            del record["eval_current"], record["best_test_accuracy"]
    write_run(tmp_path, records)
    assert_events_match_jsonl(tmp_path / "tensorboard", records)
    assert not (tmp_path / "tensorboard" / "keep_training").exists()


def test_flat_names_for_tune_and_mlflow_keep_one_name_per_regime():
    [record] = [r for r in history(range(1)) if r["kind"] == "epoch"]
    record.update(best_test_accuracy=0.7, calibration={"0.10": {"realized_keep": 0.11}})
    flat = flatten_epoch(record)
    assert {k: v for k, v in flat.items() if k.startswith("eval/")} == pytest.approx({
        **{f"eval/{split}/accuracy/keep_{key}": record["eval"][split][key]
           for split in ("val", "test") for key in REGIMES},
        "eval/val/accuracy/keep_training": 0.45, "eval/test/accuracy/keep_training": 0.44,
        "eval/val/best_accuracy": 0.5, "eval/test/best_accuracy": 0.7})


def test_layer_scope_threshold_and_skipped_steps_write_no_values(tmp_path):
    write_run(tmp_path, history(range(1)))
    accumulator = load_events(tmp_path / "tensorboard")
    assert "train/threshold" not in accumulator.Tags()["scalars"]  # None in layer scope
    assert sorted(scalar_series(accumulator, "train/loss")) == [1, 2, 4]  # the skipped step has no loss
    assert scalar_series(accumulator, "controller/nonfinite") == {2: pytest.approx(0.8)}


def layout_charts(accumulator: EventAccumulator) -> dict[str, list[str]]:
    [event] = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


def test_custom_scalar_layout_charts_every_regime_run_beside_keep_ratio(tmp_path):
    write_run(tmp_path, history(range(1)))
    log_dir = tmp_path / "tensorboard"
    charts = layout_charts(load_events(log_dir))
    [test_pattern] = charts["test accuracy: every regime and the training keep ratio"]
    matching = {run for run in ("keep_1.00", "keep_0.50", "keep_0.10", "keep_training", "")
                for tag in load_events(log_dir / run).Tags()["scalars"] if re.search(test_pattern, tag)}
    assert matching == {"keep_1.00", "keep_0.50", "keep_0.10", "keep_training"}  # one line each, one tag
    assert charts["keep ratio: requested and realized"] == [r"^train/keep_ratio$", r"^train/realized_keep$"]


def test_hparams_and_final_metrics_land_in_the_main_run(tmp_path):
    log_dir = tmp_path / "tensorboard"
    sink = TensorBoardSink(str(log_dir))
    sink.write_hparams({"optim": {"lr": 0.05, "step_milestones": [0.5, 0.75]}, "run": {"run_dir": None}},
                       {"summary/final_test/keep_1.00": 0.81}, step=12)
    sink.close()
    assert [p.name for p in log_dir.iterdir() if p.is_dir()] == []  # no timestamped sub-run
    accumulator = load_events(log_dir)
    session = plugin_data_pb2.HParamsPluginData.FromString(
        accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["optim.lr"].number_value == pytest.approx(0.05)
    assert session.hparams["optim.step_milestones"].string_value == "[0.5, 0.75]"
    assert session.hparams["run.run_dir"].string_value == "none"
    assert scalar_series(accumulator, "summary/final_test/keep_1.00") == {12: pytest.approx(0.81)}


def write_resumed_run(run_dir: Path) -> None:
    # Attempt 1 wrote epochs 0-2 (with relax events after epoch 0); it is resumed from the epoch-0
    # checkpoint (last step 4) and redoes epochs 1-2 with other values and no relax.
    write_run(run_dir, history(range(1), keep=0.8) + history(range(1, 3), keep=0.8, event="relax"))
    rewind_jsonl(str(run_dir / "metrics.jsonl"), last_epoch=0)
    write_run(run_dir, history(range(1, 3), keep=0.5), purge_step=5)


def test_resumed_run_hides_the_interrupted_attempts_redone_steps_in_every_run(tmp_path):
    write_resumed_run(tmp_path)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["keep_ratio"] for r in records if r["kind"] == "epoch"] == [0.8, 0.5, 0.5]
    log_dir = tmp_path / "tensorboard"
    assert_events_match_jsonl(log_dir, records)
    assert scalar_series(load_events(log_dir), "controller/relax") == {}
    # TensorBoard's Python loader (`--load_fast=false`) honours the purge only after a run's first start
    # marker: the sink writes one in a fresh attempt too.
    for run in ("", "keep_training", "keep_0.10"):
        accumulator = plugin_event_accumulator.EventAccumulator(str(log_dir / run), size_guidance={"tensors": 0})
        accumulator.Reload()
        if not run:
            assert accumulator.Tensors("controller/relax") == []
        keep = [e.step for e in accumulator.Tensors("epoch/keep_ratio" if not run else "eval/keep_ratio")]
        assert keep == sorted(set(keep)), (run, keep)  # each step once: the redone ones replaced


# ----------------------------------------------------------------------- the real TensorBoard server
START_TIMEOUT_S = 60


def get_json(base: str, path: str, **query):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def tensorboard_server(logdir: Path):
    """The venv's `tensorboard` on 127.0.0.1 over `logdir` (default loader); yields its base URL once it
    answers, and stops it (this process's child, by pid) on exit."""
    binary = Path(sys.executable).with_name("tensorboard")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(binary), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    with local_server(command, logdir.parent / "tensorboard.log", lambda: get_json(base, "/data/runs") is not None,
                      START_TIMEOUT_S):
        yield base


def eventually(read, want, timeout_s: float = 30.0):
    """`read()` once it returns `want` (the server loads event files in the background), else its last value."""
    deadline = time.monotonic() + timeout_s
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_tensorboard_server_overlays_every_regime_as_a_run_under_one_tag(tmp_path):
    # Two run directories under runs/ (`tensorboard --logdir runs/`): a fresh one and a resumed one.
    runs = tmp_path / "runs"
    write_run(runs / "fresh", history(range(3)))
    write_resumed_run(runs / "resumed")
    regime_runs = ["keep_1.00", "keep_0.50", "keep_0.10", "keep_training"]
    expected_run_names = {f"{name}/tensorboard{suffix}" for name in ("fresh", "resumed")
                          for suffix in ["", *(f"/{run}" for run in regime_runs)]}

    with tensorboard_server(runs) as base:
        assert eventually(lambda: set(get_json(base, "/data/runs")), expected_run_names) == expected_run_names
        # One tag, one run per regime and one for the training keep ratio, grouped under each run directory.
        def runs_with(tag):
            return {run for run, run_tags in get_json(base, "/data/plugin/scalars/tags").items() if tag in run_tags}

        want_runs = {f"{name}/tensorboard/{run}" for name in ("fresh", "resumed") for run in regime_runs}
        for tag in ("eval/test/accuracy", "eval/val/accuracy", "eval/keep_ratio"):
            assert eventually(lambda: runs_with(tag), want_runs) == want_runs, tag
        tags = get_json(base, "/data/plugin/scalars/tags")
        assert not [t for run_tags in tags.values() for t in run_tags if t.startswith("eval/test/accuracy/")]

        for name in ("fresh", "resumed"):
            expected = expected_runs(read_jsonl(str(runs / name / "metrics.jsonl")))
            for run in regime_runs:
                for tag in ("eval/test/accuracy", "eval/val/accuracy", "eval/keep_ratio"):
                    def series():
                        points = get_json(base, "/data/plugin/scalars/scalars",
                                          run=f"{name}/tensorboard/{run}", tag=tag)
                        return {step: value for _, step, value in points}
                    want = expected[run][tag]
                    got = eventually(series, {s: pytest.approx(v, rel=1e-6) for s, v in want.items()})
                    assert_series_equal(got, want, (name, run, tag))

        layout = get_json(base, "/data/plugin/custom_scalars/layout")
        charts = {chart["title"]: chart["multiline"]["tag"] for category in layout["category"]
                  for chart in category["chart"]}
        assert charts["test accuracy: every regime and the training keep ratio"] == [r"^eval/test/accuracy$"]
