"""TensorBoardSink: event files read back with TensorBoard's own reader agree with metrics.jsonl."""

from __future__ import annotations

import math
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from sparsedist.logging import JsonLinesSink, TensorBoardSink, read_jsonl, rewind_jsonl

SITES = ("block1.site1", "final")


def step_record(epoch: int, step: int, keep: float, event: str = "hold", skipped: bool = False) -> dict:
    if skipped:
        return {"kind": "step", "epoch": epoch, "step": step, "skipped": True, "loss": None,
                "event": "nonfinite", "keep_ratio": keep, "threshold": None}
    return {"kind": "step", "epoch": epoch, "step": step, "skipped": False, "loss": 2.0 / step,
            "accuracy": 0.1 * epoch + 0.01 * step, "keep_ratio": keep, "threshold": None,
            "realized_keep": keep * 0.9, "event": event, "lr": 0.05,
            "density": {site: keep * (i + 1) / 3 for i, site in enumerate(SITES)}}


def epoch_record(epoch: int, step: int, keep: float) -> dict:
    accuracies = {"1.00": 0.5 + 0.1 * epoch, "0.50": 0.4 + 0.1 * epoch, "0.10": 0.2 + 0.05 * epoch}
    return {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": 1.0 / (epoch + 1),
            "train_accuracy": 0.3 + 0.1 * epoch, "keep_ratio": keep, "threshold": None, "realized_keep": keep * 0.9,
            "events": {"tighten": 2, "hold": 1}, "lr": 0.05, "epoch_time_s": 1.5, "images_per_sec": 640.0,
            "nonfinite_steps": 0, "is_best": True, "best_val_accuracy": accuracies["1.00"],
            "eval": {"val": accuracies, "test": {k: v - 0.01 for k, v in accuracies.items()}}, "calibration": {}}


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


def assert_events_match_jsonl(accumulator: EventAccumulator, records: list[dict]) -> None:
    """Every value in metrics.jsonl is in the event files under its documented tag, at its global step."""
    expected: dict[str, dict[int, float]] = {}

    def expect(tag, step, value):
        expected.setdefault(tag, {})[step] = value

    for record in records:
        step = record["step"]
        if record["kind"] == "step":
            if not record["skipped"]:
                for key in ("loss", "accuracy", "keep_ratio", "realized_keep", "lr"):
                    expect(f"train/{key}", step, record[key])
                for site, density in record["density"].items():
                    expect(f"sparsity/density/{site}", step, density)
            if record["event"] not in ("hold", "warmup"):
                expect(f"controller/{record['event']}", step, record["keep_ratio"])
        else:
            for split, accuracies in record["eval"].items():
                for key, accuracy in accuracies.items():
                    expect(f"eval/{split}/accuracy/keep_{key}", step, accuracy)
            expect("epoch/loss", step, record["train_loss"])
            expect("epoch/images_per_sec", step, record["images_per_sec"])
            for event, count in record["events"].items():
                expect(f"controller/events/{event}", step, count)
    scalar_tags = set(accumulator.Tags()["scalars"])
    assert set(expected) <= scalar_tags, f"missing tags: {sorted(set(expected) - scalar_tags)}"
    for tag, values in expected.items():
        got = scalar_series(accumulator, tag)
        assert got.keys() == values.keys(), tag
        for step, value in values.items():
            assert math.isclose(got[step], value, rel_tol=1e-6), (tag, step, got[step], value)


def test_event_files_hold_every_jsonl_value_under_its_tag(tmp_path):
    write_run(tmp_path, history(range(3)))
    assert_events_match_jsonl(load_events(tmp_path / "tensorboard"), read_jsonl(str(tmp_path / "metrics.jsonl")))


def test_layer_scope_threshold_and_skipped_steps_write_no_values(tmp_path):
    write_run(tmp_path, history(range(1)))
    accumulator = load_events(tmp_path / "tensorboard")
    assert "train/threshold" not in accumulator.Tags()["scalars"]  # None in layer scope
    assert sorted(scalar_series(accumulator, "train/loss")) == [1, 2, 4]  # the skipped step has no loss
    assert scalar_series(accumulator, "controller/nonfinite") == {2: pytest.approx(0.8)}


def test_custom_scalar_layout_charts_every_regime_beside_keep_ratio(tmp_path):
    write_run(tmp_path, history(range(1)))
    accumulator = load_events(tmp_path / "tensorboard")
    [event] = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    tags = accumulator.Tags()["scalars"]
    test_chart = charts["test accuracy at every keep ratio"]
    assert sorted(t for t in tags if any(re.fullmatch(p, t) for p in test_chart)) == [
        "eval/test/accuracy/keep_0.10", "eval/test/accuracy/keep_0.50", "eval/test/accuracy/keep_1.00"]
    assert charts["keep ratio: requested and realized"] == ["train/keep_ratio", "train/realized_keep"]


def test_hparams_and_final_metrics_land_in_the_same_run(tmp_path):
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


def test_resumed_run_hides_the_interrupted_attempts_redone_steps(tmp_path):
    # Attempt 1 wrote epochs 0-2 (with relax events after epoch 0); it is resumed from the epoch-0
    # checkpoint (last step 4) and redoes epochs 1-2 with other values and no relax.
    write_run(tmp_path, history(range(1), keep=0.8) + history(range(1, 3), keep=0.8, event="relax"))
    rewind_jsonl(str(tmp_path / "metrics.jsonl"), last_epoch=0)
    write_run(tmp_path, history(range(1, 3), keep=0.5), purge_step=5)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["keep_ratio"] for r in records if r["kind"] == "epoch"] == [0.8, 0.5, 0.5]
    accumulator = load_events(tmp_path / "tensorboard")
    assert_events_match_jsonl(accumulator, records)
    assert scalar_series(accumulator, "controller/relax") == {}
