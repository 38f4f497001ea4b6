"""Metric records and the sinks that persist them (rank 0 only).

The training loop emits plain-dict records:
  step  -> {"kind": "step", "epoch", "batch" (1-based, in the epoch), "step", "loss", "accuracy", "keep_ratio", "threshold",
            "realized_keep", "event", "lr", "skipped", "density": {site: fraction},
            fp16 only: "loss_scale" (the scale the step ran with), "overflow" (its update was skipped)}
  epoch -> {"kind": "epoch", "epoch", "step", "train_loss", "train_accuracy", "keep_ratio",
            "threshold", "realized_keep", "events": {event: count}, "lr", "epoch_time_s", "at_chance",
            "images_per_sec", "nonfinite_steps", "overflow_steps", "is_best", "selection",
            "best_val_accuracy", "best_test_accuracy",
            "eval": {"val": {"1.00": acc, ...}, "test": {...}},
            "eval_current": {"keep_ratio": rho, "val": acc or None, "test": acc},
            "calibration": {"0.10": {"threshold", "realized_keep", "iterations", "converged"}}}
`eval` and `calibration` are `{}` on epochs that do not evaluate, and so is `eval_current` (the model
evaluated at the training keep ratio of the epoch's end; absent in older runs, like `best_test_accuracy`).
`best_val_accuracy` is set under the held-out selection protocol, `best_test_accuracy` under the paper's.
Regime keys are `config.regime_key(rho)` ("0.10", "0.025": unique per rho). Sinks take `write(record)` and `close()`: JsonLinesSink
(metrics.jsonl, the run's history) and TensorBoardSink. The driver follows metrics.jsonl with
JsonLinesTail and shows it as a ProgressLine.

Metric names: flat names (`flatten_epoch`: Ray report, Tune; `tensorboard_scalars`: MLflow) give every
regime its own name, `eval/<split>/accuracy/keep_<rho>` and `.../keep_training`. TensorBoard instead
(`tensorboard_runs`) gives every regime its own run inside the log dir, `keep_<rho>/` and `keep_training/`,
under shared tags (`eval/<split>/accuracy`, `eval/keep_ratio`, `eval/calibration/realized_keep`), so one
chart overlays them in distinct colours. A regime's flat name is its TensorBoard tag + "/" + its run
(`eval/keep_ratio`, constant per regime, is TensorBoard's only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Protocol, TextIO

from sparsedist import storage
from sparsedist.atomic import write_atomic


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


def read_jsonl(location: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl at a path or a storage URI. A last line without its newline is a
    record still being written (the file of a live run): it is left out."""
    lines = storage.read_bytes(location).decode("utf-8").split("\n")[:-1]  # the part after the last newline
    return [json.loads(line) for line in lines if line.strip()]


def flatten_epoch(record: dict[str, Any]) -> dict[str, float]:
    """An epoch record as flat `train/...`, `eval/<split>/accuracy/keep_<rho>` scalars (Ray report, Tune,
    MLflow): the model at the training keep ratio is `eval/<split>/accuracy/keep_training`, the selection
    protocol's best dense accuracy so far `eval/val/best_accuracy` (held-out) or `eval/test/best_accuracy`
    (paper)."""
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
        "train/overflow_steps": record.get("overflow_steps", 0),  # absent in runs before fp16 existed
    }
    for (run, tag), value in regime_scalars(record).items():
        if tag not in (KEEP_RATIO_TAG, CALIBRATION_TAG):  # the accuracies; a regime's keep ratio is in its name
            flat[f"{tag}/{run}"] = value
    for split in ("val", "test"):
        if record.get(f"best_{split}_accuracy") is not None:
            flat[f"eval/{split}/best_accuracy"] = record[f"best_{split}_accuracy"]
    return flat


def rewind_jsonl(path: str, last_epoch: int, partial_batches: int | None = None) -> None:
    """Drop the records past a checkpoint: those of epochs after `last_epoch`, except, for a mid-epoch
    checkpoint, the step records of the next epoch's first `partial_batches` batches. A run resumed from it
    redoes the rest, and one clean history keeps metrics.jsonl, TensorBoard and summary.json in agreement."""
    if not os.path.exists(path):
        return

    def before(record: dict[str, Any]) -> bool:
        if record["epoch"] <= last_epoch:
            return True
        return (partial_batches is not None and record["kind"] == "step" and record["epoch"] == last_epoch + 1
                and record["batch"] <= partial_batches)

    kept = [record for record in read_jsonl(path) if before(record)]
    write_atomic(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in kept).encode())


class JsonLinesTail:
    """The records appended to a metrics.jsonl since the previous `read_new()`: the driver's view of a run
    whose workers may live on other nodes (the run directory is shared storage)."""

    def __init__(self, path: str):
        self.path = path
        self._offset, self._inode, self._partial = 0, None, b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return []
        if stat.st_ino != self._inode:  # first sight, or replaced by `rewind_jsonl` after a restart
            self._offset, self._inode, self._partial = 0, stat.st_ino, b""
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        *lines, self._partial = (self._partial + chunk).split(b"\n")  # the last piece may be half-written
        return [json.loads(line) for line in lines if line.strip()]


# ------------------------------------------------------------------------------ TensorBoard
# TensorBoard runs inside a run's log dir: "" is the main run (train/*, epoch/*, controller/*, sparsity/*,
# best accuracies, hparams); each evaluated regime is `keep_<regime_key>` and the model at the training
# keep ratio `keep_training`, all under the shared tags below.
MAIN_RUN = ""
TRAINING_RUN = "keep_training"
ACCURACY_TAG = "eval/{split}/accuracy"
KEEP_RATIO_TAG = "eval/keep_ratio"  # each regime run's rho (flat), keep_training's the training rho
CALIBRATION_TAG = "eval/calibration/realized_keep"  # network scope: the keep the regime's tau realizes


def regime_run(key: str) -> str:
    """The TensorBoard run of the regime with regime key `key` ("keep_0.10")."""
    return f"keep_{key}"


# The custom-scalars page: each split's accuracy (one line per regime run and keep_training, each its
# run's colour) beside the requested and realized keep ratio. The time-series tab has the same overlays
# as cards, one per tag; this page puts the three side by side.
REGIME_LAYOUT = {
    "regimes": {
        "test accuracy: every regime and the training keep ratio": ["Multiline", [r"^eval/test/accuracy$"]],
        "validation accuracy: every regime and the training keep ratio": ["Multiline", [r"^eval/val/accuracy$"]],
        "keep ratio: requested and realized": ["Multiline", [r"^train/keep_ratio$", r"^train/realized_keep$"]],
    }
}
QUIET_EVENTS = ("hold", "warmup")  # controller decisions that change nothing and are not marked


def regime_scalars(record: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(TensorBoard run, tag) -> value for an epoch record's per-regime scalars: each regime's and the
    training keep ratio's accuracy per split, its keep ratio (`KEEP_RATIO_TAG`) and, in network scope, the
    keep its calibrated threshold realizes. Epochs that did not evaluate have none."""
    scalars: dict[tuple[str, str], Any] = {}
    for split, accuracies in record.get("eval", {}).items():
        for key, accuracy in accuracies.items():
            scalars[(regime_run(key), ACCURACY_TAG.format(split=split))] = accuracy
            scalars[(regime_run(key), KEEP_RATIO_TAG)] = float(key)
    current = record.get("eval_current") or {}
    for split in ("val", "test"):
        if current.get(split) is not None:
            scalars[(TRAINING_RUN, ACCURACY_TAG.format(split=split))] = current[split]
            scalars[(TRAINING_RUN, KEEP_RATIO_TAG)] = current["keep_ratio"]
    for key, calibration in record.get("calibration", {}).items():
        scalars[(regime_run(key), CALIBRATION_TAG)] = calibration["realized_keep"]
    return {run_tag: float(value) for run_tag, value in scalars.items() if value is not None}


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Flat metric name -> value for one record, all placed at the record's global step (MLflow's names,
    which has no sub-runs; TensorBoard itself splits them into runs with `tensorboard_runs`).

    Step records give `train/*`, `sparsity/density/<site>` and a `controller/<event>` marker (value: the
    keep ratio the decision was taken at). Epoch records give `eval/{val,test}/accuracy/keep_<rho>` (and
    `.../keep_training`), `eval/calibration/realized_keep/keep_<rho>`, `eval/{val,test}/best_accuracy`,
    epoch means as `epoch/*` (so they do not mix into the per-step `train/*` curves) and
    `controller/events/<event>` counts.
    """
    scalars: dict[str, Any] = {}
    if record["kind"] == "step":
        for key in ("loss", "accuracy", "keep_ratio", "threshold", "realized_keep", "lr", "loss_scale"):
            scalars[f"train/{key}"] = record.get(key)
        for site, density in (record.get("density") or {}).items():
            scalars[f"sparsity/density/{site}"] = density
        if record.get("event") not in QUIET_EVENTS:
            scalars[f"controller/{record['event']}"] = record["keep_ratio"]
    else:
        for key, value in flatten_epoch(record).items():
            if key.startswith("train/"):
                scalars["epoch/" + key.removeprefix("train/")] = value
            elif key not in ("epoch", "step"):
                scalars[key] = value
        for event, count in record.get("events", {}).items():
            scalars[f"controller/events/{event}"] = count
        for (run, tag), value in regime_scalars(record).items():
            if tag == CALIBRATION_TAG:
                scalars[f"{tag}/{run}"] = value
    # A threshold is None in layer scope; a skipped step has no loss.
    return {tag: float(value) for tag, value in scalars.items() if value is not None}


def tensorboard_runs(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """TensorBoard run (`MAIN_RUN`, a regime's run, `TRAINING_RUN`) -> tag -> value for one record: the
    per-regime scalars in their runs under shared tags, everything else in the main run under its flat name."""
    runs: dict[str, dict[str, float]] = {}
    per_regime = regime_scalars(record) if record["kind"] == "epoch" else {}
    for (run, tag), value in per_regime.items():
        runs.setdefault(run, {})[tag] = value
    moved = {f"{tag}/{run}" for run, tag in per_regime}
    main = {tag: value for tag, value in tensorboard_scalars(record).items() if tag not in moved}
    return {MAIN_RUN: main, **runs}


def flatten_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config dict as dotted TensorBoard hparams (lists become their text, None becomes "none")."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_hparams(value, f"{path}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[path] = value
        else:
            flat[path] = "none" if value is None else json.dumps(value)
    return flat


class TensorBoardSink:
    """Rank 0's TensorBoard runs: the main run in `log_dir`, and one run per regime (and `keep_training`)
    in its subdirectories, created as they first appear (tags: `tensorboard_runs`, layout: `REGIME_LAYOUT`).
    `tensorboard --logdir` on the run directory's parent still groups them under each run directory.

    `purge_step`: on resume, the first step that will be redone; TensorBoard hides events written at or
    after it by the interrupted attempt, in every run of the log dir. A fresh attempt purges from step 0
    (an earlier attempt that died before its first checkpoint is hidden too), and writing that first
    purge marker matters: TensorBoard's Python loader (`--load_fast=false`) takes a run's first marker
    for its start and only later ones for restarts. The default Rust loader ignores the markers and
    replaces a tag's points from a step on when that step is written again: the redone epochs' values
    replace the interrupted attempt's, but a tag the resumed attempt never writes again (a controller
    event marker) keeps its stale points there.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # rank 0 only: keeps other ranks' imports light

        self._summary_writer, self.log_dir = SummaryWriter, log_dir
        self.purge_step = 0 if purge_step is None else purge_step
        self.writer = SummaryWriter(log_dir, purge_step=self.purge_step)
        self.writer.add_custom_scalars(REGIME_LAYOUT)
        self.writers = {MAIN_RUN: self.writer}

    def _writer(self, run: str):
        if run not in self.writers:
            # Each writer is created with the purge step: a resumed run hides the redone steps in every run.
            self.writers[run] = self._summary_writer(os.path.join(self.log_dir, run), purge_step=self.purge_step)
        return self.writers[run]

    def write(self, record: dict[str, Any]) -> None:
        for run, scalars in tensorboard_runs(record).items():
            for tag, value in scalars.items():
                self._writer(run).add_scalar(tag, value, record["step"])

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        # run_name="." keeps the hparams in the main run instead of a new timestamped sub-run.
        self.writer.add_hparams(flatten_hparams(hparams), metrics, run_name=".", global_step=step)
        self.writer.flush()

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


# --------------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_text(record: dict[str, Any], total_epochs: int, eta_s: float | None, images_per_sec: float | None) -> str:
    """One line: epoch, step, current rho (and realized keep), images/s, ETA, then accuracies once known."""
    parts = [f"epoch {record['epoch'] + 1}/{total_epochs}", f"step {record['step']}",
             f"rho {record['keep_ratio']:.3f}"]
    if record.get("realized_keep") is not None:
        parts[-1] += f" (realized {record['realized_keep']:.3f})"
    parts.append(f"{images_per_sec:,.0f} img/s" if images_per_sec else "-- img/s")
    parts.append(f"ETA {format_duration(eta_s)}" if eta_s is not None else "ETA --")
    loss = record.get("loss") if record["kind"] == "step" else record.get("train_loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if record["kind"] == "step" and record.get("accuracy") is not None:
        parts.append(f"train acc {record['accuracy']:.3f}")
    if record.get("at_chance"):
        parts.append(f"NOT LEARNING: train acc {record['train_accuracy']:.3f} at chance")
    evaluation = record.get("eval", {})
    for split in [s for s in ("val", "test") if s in evaluation]:
        regimes = sorted(evaluation[split].items(), key=lambda item: -float(item[0]))  # dense first
        parts.append(f"{split} " + " ".join(f"{key}:{accuracy:.3f}" for key, accuracy in regimes))
    return "  ".join(parts)


def epoch_line(record: dict[str, Any], total_epochs: int, seconds_per_epoch: float) -> str:
    """The line rank 0 logs at the end of every epoch (what `ray job logs` and non-terminal output show)."""
    eta = seconds_per_epoch * (total_epochs - record["epoch"] - 1)
    return progress_text(record, total_epochs, eta, record["images_per_sec"])


def record_key(record: dict[str, Any]) -> tuple:
    return record["kind"], record["epoch"], record["step"], record.get("skipped", False)


class ProgressLine:
    """The driver's progress: one line per epoch, rewritten in place as step records arrive and ended with
    the epoch's accuracies. Prints nothing when the stream is not a terminal (logs, `ray job` output).

    Records already shown, or passed to `skip` (a resumed run's history), are not shown again: after a
    restart rank 0 rewrites metrics.jsonl and the tail reads the kept history again.
    """

    def __init__(self, total_epochs: int, stream: TextIO | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total_epochs = total_epochs
        self.clock = clock
        self._seen: set[tuple] = set()
        self._start: float | None = None  # arrival of the first record of this session
        self._epochs_seen = 0
        self._epoch_start: float | None = None
        self._images_per_sec: float | None = None

    def eta(self, epochs_left: int, now: float) -> float | None:
        if not self._epochs_seen:
            return None
        mean_epoch_s = (self._epoch_start - self._start) / self._epochs_seen
        return max(0.0, epochs_left * mean_epoch_s - (now - self._epoch_start))

    def skip(self, records: list[dict[str, Any]]) -> None:
        self._seen.update(record_key(record) for record in records)

    def update(self, record: dict[str, Any]) -> None:
        if record_key(record) in self._seen:
            return
        self._seen.add(record_key(record))
        now = self.clock()
        if self._start is None:
            self._start = self._epoch_start = now
        if record["kind"] == "epoch":
            self._epochs_seen += 1
            self._epoch_start = now
            self._images_per_sec = record["images_per_sec"]
        epochs_left = self.total_epochs - record["epoch"] - (record["kind"] == "epoch")
        if not self.live:
            return
        text = progress_text(record, self.total_epochs, self.eta(epochs_left, now), self._images_per_sec)
        # \r + erase-line rewrites the current line; an epoch record ends it.
        self.stream.write("\r\x1b[2K" + text + ("\n" if record["kind"] == "epoch" else ""))
        self.stream.flush()
