"""One run directory as data: its resolved config, epoch and step records, and their summary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from sparsedist import storage
from sparsedist.config import Config, validate
from sparsedist.rundir import CONFIG_FILE, METRICS_FILE
from sparsedist.report.summary import summarize
from sparsedist.logging import read_jsonl


@dataclass
class RunRecords:
    run_dir: str
    config: Config
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    summary: dict[str, Any] | None  # `report.summary.summarize` of the epochs; None before the first evaluation
    completed: bool  # every configured epoch ran (a scheduler may still have stopped its driver at the last report)

    @property
    def name(self) -> str:
        return os.path.basename(self.run_dir.rstrip("/"))


def is_run_dir(path: str) -> bool:
    return storage.is_file(storage.join(path, CONFIG_FILE))


def read_run(run_dir: str) -> RunRecords:
    """Read a run directory, a path or a storage URI (config.yaml and metrics.jsonl, both written by the launch)."""
    run_dir = storage.absolute(run_dir)
    config = validate(yaml.safe_load(storage.read_bytes(storage.join(run_dir, CONFIG_FILE))))
    metrics_path = storage.join(run_dir, METRICS_FILE)
    records = read_jsonl(metrics_path) if storage.is_file(metrics_path) else []
    epochs = [r for r in records if r["kind"] == "epoch"]
    evaluated = any(r["eval"] for r in epochs)
    summary = summarize(records, select_keep_ratio=config.eval.select_keep_ratio) if evaluated else None
    completed = bool(epochs) and epochs[-1]["epoch"] == config.train.epochs - 1
    return RunRecords(run_dir, config, epochs, [r for r in records if r["kind"] == "step"], summary, completed)


def selected_test(run: RunRecords) -> dict[str, float]:
    """Per-regime test accuracy of the validation-selected checkpoint (the run's result); {} if none yet."""
    if run.summary is None or run.summary["selected"] is None:
        return {}
    return run.summary["selected"]["test"]
