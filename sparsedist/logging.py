"""Metric records and the sinks that persist them (rank 0 only).

The training loop emits plain-dict records:
  step  -> {"kind": "step", "epoch", "step", "loss", "accuracy", "keep_ratio", "threshold",
            "realized_keep", "event", "lr", "skipped", "density": {site: fraction}}
  epoch -> {"kind": "epoch", "epoch", "step", "train_loss", "train_accuracy", "keep_ratio",
            "threshold", "realized_keep", "events": {event: count}, "lr", "epoch_time_s", "at_chance",
            "images_per_sec", "nonfinite_steps", "is_best", "best_val_accuracy",
            "eval": {"val": {"1.00": acc, ...}, "test": {...}},
            "calibration": {"0.10": {"threshold", "realized_keep", "iterations", "converged"}}}
Regime keys are `regime_key(rho)` ("0.10", "0.025": unique per rho). Sinks take `write(record)` and `close()`: JsonLinesSink
(metrics.jsonl, the run's history) and TensorBoardSink. The driver follows metrics.jsonl with
JsonLinesTail and shows it as a ProgressLine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Protocol, TextIO

from sparsedist import storage
from sparsedist.atomic import write_atomic


def regime_key(keep_ratio: float) -> str:
    """A keep ratio's name in records, TensorBoard tags, sweep columns and tables: two decimals ("0.10")
    when they state it exactly, else Python's shortest exact form ("0.025"), so distinct keep ratios never
    share a name (0.025 and 0.03 would both be "0.03" at two decimals)."""
    two_decimals = f"{keep_ratio:.2f}"
    return two_decimals if float(two_decimals) == keep_ratio else repr(float(keep_ratio))


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


def rewind_jsonl(path: str, last_epoch: int) -> None:
    """Drop the records of epochs after `last_epoch`: a run resumed from that epoch's checkpoint redoes
    them, and one clean history keeps metrics.jsonl, TensorBoard and summary.json in agreement."""
    if not os.path.exists(path):
        return
    kept = [record for record in read_jsonl(path) if record["epoch"] <= last_epoch]
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
# One chart with every regime's accuracy per split, beside the requested and realized keep ratio.
REGIME_LAYOUT = {
    "regimes": {
        "validation accuracy at every keep ratio": ["Multiline", [r"eval/val/accuracy/keep_.*"]],
        "test accuracy at every keep ratio": ["Multiline", [r"eval/test/accuracy/keep_.*"]],
        "keep ratio: requested and realized": ["Multiline", [r"train/keep_ratio", r"train/realized_keep"]],
    }
}
QUIET_EVENTS = ("hold", "warmup")  # controller decisions that change nothing and are not marked


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one record, all placed at the record's global step.

    Step records give `train/*`, `sparsity/density/<site>` and a `controller/<event>` marker (value: the
    keep ratio the decision was taken at). Epoch records give `eval/{val,test}/accuracy/keep_<rho>`,
    epoch means as `epoch/*` (so they do not mix into the per-step `train/*` curves) and
    `controller/events/<event>` counts.
    """
    scalars: dict[str, Any] = {}
    if record["kind"] == "step":
        for key in ("loss", "accuracy", "keep_ratio", "threshold", "realized_keep", "lr"):
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
        for key, calibration in record.get("calibration", {}).items():
            scalars[f"eval/calibration/realized_keep/keep_{key}"] = calibration["realized_keep"]
    # A threshold is None in layer scope; a skipped step has no loss.
    return {tag: float(value) for tag, value in scalars.items() if value is not None}


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
    """Rank 0's TensorBoard run (tags: `tensorboard_scalars`, layout: `REGIME_LAYOUT`).

    `purge_step`: on resume, the first step that will be redone; TensorBoard hides events written at or
    after it by the interrupted attempt.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # rank 0 only: keeps other ranks' imports light

        self.writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.writer.add_custom_scalars(REGIME_LAYOUT)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        # run_name="." keeps the hparams in this run instead of a new timestamped sub-run.
        self.writer.add_hparams(flatten_hparams(hparams), metrics, run_name=".", global_step=step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
