"""`sparsedist report`: figures and a markdown page for run directories and sweep directories.

A run directory is one curve. A sweep directory contributes one curve per group (its completed trials,
across seeds) and, for the per-run figures, each group's first completed trial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Sequence

from sparsedist import storage
from sparsedist.report.figures import (MAX_PANELS, Series, plot_accuracy_vs_keep, plot_inference_cost, plot_keep_trajectories,
                                       plot_train_vs_val)
from sparsedist.report.runs import RunRecords, is_run_dir, read_run, selected_test
from sparsedist.report.stats import ACCURACY_BOUNDS, group_stats
from sparsedist.report.reproduction import is_reproduction, write_paper_table
from sparsedist.report.sweep import (SUMMARY_MD, SWEEP_FILE, TRIAL_FILE, TUNE_DIR, group_trials, read_sweep_file,
                                     read_trials)
from sparsedist.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

REPORT_MD = "report.md"
FIGURES = {
    "accuracy_vs_keep.png": "Accuracy vs keep ratio",
    "keep_trajectory.png": "Keep-ratio trajectory over training",
    "train_vs_val.png": "Train vs validation accuracy",
}
INFERENCE_FIGURE = "inference_cost.png"


class ReportError(ValueError):
    """An input is neither a run directory nor a sweep directory, or holds no results yet."""


def collect(paths: Sequence[str]) -> tuple[list[Series], list[tuple[str, RunRecords]], list[str]]:
    """Curves, the (title, run) pairs of the per-run figures, and the sweep summaries to link."""
    series, shown, summaries = [], [], []
    for path in map(os.path.abspath, paths):
        if os.path.isfile(os.path.join(path, SWEEP_FILE)):
            name = os.path.basename(path)
            for group in group_trials(read_trials(path)):
                runs = [t.run for t in group.completed]
                if runs:
                    label = f"{name}: {group.label}" if len(paths) > 1 else group.label
                    series.append(Series(label, runs))
                    shown.append((f"{label} ({runs[0].name})", runs[0]))
            if os.path.isfile(os.path.join(path, SUMMARY_MD)):
                summaries.append(os.path.join(path, SUMMARY_MD))
        elif is_run_dir(path):
            run = read_run(path)
            if run.summary is not None:
                series.append(Series(run.name, [run]))
                shown.append((run.name, run))
        else:
            raise ReportError(f"{path} is neither a run directory (config.yaml) nor a sweep directory ({SWEEP_FILE})")
    if not series:
        raise ReportError("no completed, evaluated run among the inputs: nothing to report")
    return series, shown, summaries


def _accuracy_table(series: list[Series]) -> list[str]:
    keys = sorted({k for s in series for run in s.runs for k in selected_test(run)}, key=float, reverse=True)
    lines = ["| run / group | n | " + " | ".join(f"keep {k}" for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for curve in series:
        cells = []
        for key in keys:
            values = [selected_test(run)[key] for run in curve.runs if key in selected_test(run)]
            if not values:
                cells.append("–")
                continue
            stats = group_stats(values, bounds=ACCURACY_BOUNDS)
            # Clipped to [0, 1], the interval is not symmetric about the mean: both ends are shown.
            cells.append(f"{stats.mean:.4f}" + (f" [{stats.ci_low:.4f}, {stats.ci_high:.4f}]" if stats.n >= 2 else ""))
        lines.append(f"| {curve.label} | {len(curve.runs)} | " + " | ".join(cells) + " |")
    return lines


def write_report(paths: Sequence[str], out_dir: str, bench_json: str | None = None) -> str:
    """Write the three figures and report.md into out_dir, plus the inference-cost figure of a
    `sparsedist bench inference` JSON when given; returns the markdown file's path."""
    series, shown, summaries = collect(paths)
    os.makedirs(out_dir, exist_ok=True)
    plot_accuracy_vs_keep(series, os.path.join(out_dir, "accuracy_vs_keep.png"))
    plot_keep_trajectories(shown, os.path.join(out_dir, "keep_trajectory.png"))
    plot_train_vs_val(shown, os.path.join(out_dir, "train_vs_val.png"))
    lines = [
        "# sparsedist report", "",
        "Inputs: " + ", ".join(f"`{os.path.abspath(p)}`" for p in paths), "",
        "## Test accuracy of the selected checkpoint per keep ratio", "",
        "Each run's checkpoint with the best selection accuracy at eval.select_keep_ratio (validation; test under "
        "eval.selection paper, best-on-test); for groups the mean "
        "over seeds and the 95% Student-t interval, clipped to [0, 1].", "",
        *_accuracy_table(series), "",
    ]
    if len(shown) > MAX_PANELS:
        lines += [f"Per-run figures show the first {MAX_PANELS} of {len(shown)} runs.", ""]
    lines += [f"Sweep statistics (Welch's t-test against dense): [{s}]({os.path.relpath(s, out_dir)})" for s in summaries]
    for path in paths:  # a `sparsedist reproduce` sweep also gets the paper's table
        if os.path.isfile(os.path.join(path, SWEEP_FILE)) and is_reproduction(read_sweep_file(path)):
            table, figure = write_paper_table(path, out_dir=out_dir)
            lines += ["", f"The paper's table with 95% intervals: [{os.path.basename(table)}]({os.path.basename(table)}), "
                      f"![the paper's table]({os.path.basename(figure)})"]
    for file_name, title in FIGURES.items():
        lines += ["", f"## {title}", "", f"![{title}]({file_name})"]
    if bench_json:
        with open(bench_json, encoding="utf-8") as handle:
            plot_inference_cost(json.load(handle), os.path.join(out_dir, INFERENCE_FIGURE))
        lines += ["", "## Accuracy and CPU latency of the exported model vs keep ratio", "",
                  f"From `{os.path.abspath(bench_json)}`.", "", f"![inference cost]({INFERENCE_FIGURE})"]
    path = os.path.join(out_dir, REPORT_MD)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sparsedist report` arguments."""
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run directories and sweep directories")
    parser.add_argument("--out", help="output directory (default: <first input>/report; ./report for a storage URI)")
    parser.add_argument("--bench-json", help="a `sparsedist bench inference --json` file: adds accuracy and latency vs rho")


# What reports (and MLflow's artifact logging) read of a run or sweep directory.
REPORTED_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, TRIAL_FILE, SWEEP_FILE, SUMMARY_MD)


def unread_by_reports(relative: str) -> bool:
    """A run or sweep read from storage is copied with only the files a report reads: no checkpoints,
    hand-off states, TensorBoard events, or Tune's own state."""
    parts = relative.split("/")
    return parts[0] == TUNE_DIR or parts[-1] not in REPORTED_FILES


def report_from_args(args: argparse.Namespace) -> int:
    try:
        for path in args.paths:
            storage.check_readable(path)
        with contextlib.ExitStack() as stack:
            paths = [stack.enter_context(storage.local_view(path, exclude=unread_by_reports)) for path in args.paths]
            # A run read from storage is a temporary copy: its report goes to ./report unless --out says where.
            default_out = "report" if storage.is_uri(args.paths[0]) else os.path.join(paths[0], "report")
            page = write_report(paths, args.out or default_out, args.bench_json)
    except (ReportError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0
