"""Metric records and the sinks that persist them (rank 0 only).

The training loop emits plain-dict records:
  step  -> {"kind": "step", "epoch", "step", "loss", "accuracy", "keep_ratio", "threshold",
            "realized_keep", "event", "lr", "skipped", "density": {site: fraction}}
  epoch -> {"kind": "epoch", "epoch", "step", "train_loss", "train_accuracy", "keep_ratio",
            "threshold", "realized_keep", "events": {event: count}, "lr", "epoch_time_s",
            "images_per_sec", "nonfinite_steps", "is_best", "best_val_accuracy",
            "eval": {"val": {"1.00": acc, ...}, "test": {...}},
            "calibration": {"0.10": {"threshold", "realized_keep", "iterations", "converged"}}}
Regime keys are `regime_key(rho)` ("%.2f"). Sinks take `write(record)` and `close()`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol


def regime_key(keep_ratio: float) -> str:
    return f"{keep_ratio:.2f}"


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """Appends one JSON object per record to `metrics.jsonl`, flushed per record so a crash loses nothing."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def flatten_epoch(record: dict[str, Any]) -> dict[str, float]:
    """An epoch record as flat `train/...`, `eval/<split>/accuracy/keep_<rho>` scalars (Ray report, Tune, TensorBoard)."""
    flat = {
        "epoch": record["epoch"],
        "step": record["step"],
        "train/loss": record["train_loss"],
        "train/accuracy": record["train_accuracy"],
        "train/keep_ratio": record["keep_ratio"],
        "train/threshold": record["threshold"],
        "train/realized_keep": record["realized_keep"],
        "train/lr": record["lr"],
        "train/images_per_sec": record["images_per_sec"],
        "train/nonfinite_steps": record["nonfinite_steps"],
    }
    for split, accuracies in record.get("eval", {}).items():
        for key, accuracy in accuracies.items():
            flat[f"eval/{split}/accuracy/keep_{key}"] = accuracy
    if record.get("best_val_accuracy") is not None:
        flat["eval/val/best_accuracy"] = record["best_val_accuracy"]
    return flat
