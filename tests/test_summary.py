"""summary.json selects by validation, reports best-test only beside it, and totals speed correctly."""

from __future__ import annotations

import pytest

from sparsedist.report.summary import regime_table, summarize


def epoch(index, val, test, is_best, eval_done=True, keep=0.5, events=None):
    return {"kind": "epoch", "epoch": index, "step": 10 * (index + 1), "keep_ratio": keep, "realized_keep": keep - 0.1,
            "events": events or {"tighten": 1}, "epoch_time_s": 2.0, "images_per_sec": 100.0 * (index + 1),
            "is_best": is_best, "calibration": {},
            "eval": {"val": {"1.00": val, "0.10": val / 2}, "test": {"1.00": test, "0.10": test / 2}} if eval_done else {}}


RECORDS = [
    {"kind": "step", "epoch": 0, "step": 1},
    epoch(0, val=0.60, test=0.90, is_best=True),   # best on test, not on validation
    epoch(1, val=0.80, test=0.70, is_best=True),   # best on validation
    epoch(2, val=0.0, test=0.0, is_best=False, eval_done=False, keep=0.3, events={"relax": 1}),
    epoch(3, val=0.75, test=0.72, is_best=False, keep=0.2),
]


def test_selected_checkpoint_is_chosen_by_validation_and_best_test_is_kept_apart():
    summary = summarize(RECORDS, select_keep_ratio=1.0)
    assert summary["selected"]["epoch"] == 1
    assert summary["selected"]["test"]["1.00"] == 0.70
    assert summary["test_best_per_regime"]["1.00"] == 0.90
    assert summary["final"]["epoch"] == 3 and summary["final"]["test"]["1.00"] == 0.72
    assert summary["selected"]["selected_by"] == "validation accuracy at keep ratio 1.00"


def test_speed_keep_ratios_and_events_are_totalled_over_epochs():
    summary = summarize(RECORDS, select_keep_ratio=1.0)
    assert summary["epochs_completed"] == 4 and summary["steps"] == 40
    assert summary["train_time_s"] == 8.0
    assert summary["images_per_sec"] == pytest.approx((100 + 200 + 300 + 400) * 2.0 / 8.0)
    assert summary["keep_ratio"]["final"] == 0.2
    assert summary["keep_ratio"]["realized_mean"] == pytest.approx((0.4 + 0.4 + 0.2 + 0.1) / 4)
    assert summary["controller_events"] == {"tighten": 3, "relax": 1}


def test_table_lists_regimes_from_dense_down_with_the_best_test_column_labelled():
    lines = regime_table(summarize(RECORDS, select_keep_ratio=1.0)).splitlines()
    assert lines[0].split() == ["keep", "final", "val", "final", "test", "selected", "test", "(epoch", "2)", "best", "test*"]
    assert [line.split()[0] for line in lines[2:4]] == ["1.00", "0.10"]
    assert lines[2].split() == ["1.00", "0.7500", "0.7200", "0.7000", "0.9000"]
    assert "comparison with the paper only" in lines[-1]


def test_a_run_without_a_finished_epoch_cannot_be_summarized():
    with pytest.raises(ValueError, match="not completed an epoch"):
        summarize(RECORDS[:1], select_keep_ratio=1.0)
