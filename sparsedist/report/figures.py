"""Report figures as PNG files, drawn on matplotlib `Figure` objects (Agg canvas, no pyplot state).

- accuracy vs keep ratio: one curve per run or group, the validation-selected checkpoint's test
  accuracy, with the 95% interval across seeds (clipped to [0, 1]) as a band where a group has two or more runs;
- the keep-ratio trajectory over training: requested rho and realized keep per logged step, with
  the controller's tighten and relax/reset decisions marked;
- train vs validation accuracy per epoch (the overfitting picture), selected epoch marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sparsedist.config import regime_key
from sparsedist.report.runs import RunRecords, selected_test
from sparsedist.report.stats import ACCURACY_BOUNDS, group_stats

MAX_PANELS = 12  # per-run figures show at most this many runs
PANEL_SIZE = (4.5, 3.0)  # inches
DPI = 110
# Decisions drawn on the trajectory: marker, colour, legend label.
EVENT_MARKS = {
    "tighten": ("v", "tab:blue", "tighten"),
    "relax": ("^", "tab:orange", "relax"),
    "reset": ("^", "tab:red", "reset to top"),
}


@dataclass
class Series:
    """One curve: a single run, or the runs of one sweep group (its seeds)."""

    label: str
    runs: list[RunRecords]


def _panel_grid(count: int) -> tuple[Figure, list]:
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _draw_accuracy_vs_keep(axis, series: list[Series]) -> None:
    """Per curve, the mean selected test accuracy at every keep ratio with its 95% CI band across seeds."""
    ratios: set[float] = set()
    for curve in series:
        by_key: dict[str, list[float]] = {}
        for run in curve.runs:
            for key, accuracy in selected_test(run).items():
                by_key.setdefault(key, []).append(accuracy)
        keys = sorted(by_key, key=float)
        if not keys:
            continue
        stats = [group_stats(by_key[k], bounds=ACCURACY_BOUNDS) for k in keys]
        x = [float(k) for k in keys]
        ratios.update(x)
        n = max(s.n for s in stats)
        line, = axis.plot(x, [s.mean for s in stats], marker="o", label=f"{curve.label} (n={n})")
        if n >= 2:
            axis.fill_between(x, [s.ci_low for s in stats], [s.ci_high for s in stats], color=line.get_color(), alpha=0.2)
    axis.set_xscale("log")
    axis.set_xticks(sorted(ratios), [regime_key(r) for r in sorted(ratios)])
    axis.minorticks_off()
    axis.set_xlabel("keep ratio at evaluation (log scale)")
    axis.set_ylabel("test accuracy (selected checkpoint)")
    axis.grid(alpha=0.3)


def plot_accuracy_vs_keep(series: list[Series], path: str) -> None:
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axis = figure.subplots()
    _draw_accuracy_vs_keep(axis, series)
    axis.set_title("Accuracy vs keep ratio (bands: 95% CI across seeds)")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=DPI)


def plot_reproduction(panels: dict[str, list[Series]], reference: dict[str, float], path: str) -> None:
    """One panel per selection rule (title -> curves), with the paper's single-run dense numbers (label ->
    accuracy) as stars at keep ratio 1."""
    figure, axes = _panel_grid(len(panels))
    for axis, (title, series) in zip(axes, panels.items()):
        _draw_accuracy_vs_keep(axis, series)
        for index, (label, accuracy) in enumerate(reference.items()):
            axis.plot([1.0], [accuracy], marker="*", markersize=11, linestyle="none", color=f"C{index}",
                      markeredgecolor="black", label=f"paper, {label} (single run)")
        axis.set_title(title, fontsize="medium")
        axis.legend(fontsize="x-small")
    figure.savefig(path, dpi=DPI)


def plot_keep_trajectories(runs: list[tuple[str, RunRecords]], path: str) -> None:
    """One panel per (title, run)."""
    figure, axes = _panel_grid(min(len(runs), MAX_PANELS))
    for axis, (title, run) in zip(axes, runs):
        steps = [r for r in run.steps if not r.get("skipped")]
        axis.plot([r["step"] for r in steps], [r["keep_ratio"] for r in steps], lw=1, color="black", label="rho (requested)")
        axis.plot([r["step"] for r in steps], [r["realized_keep"] for r in steps], lw=1, color="tab:green", alpha=0.7,
                  label="realized keep")
        for event, (marker, colour, label) in EVENT_MARKS.items():
            marked = [r for r in steps if r["event"] == event]
            if marked:
                axis.scatter([r["step"] for r in marked], [r["keep_ratio"] for r in marked], marker=marker, s=14,
                             color=colour, label=label, zorder=3)
        axis.set_ylim(0, 1.05)
        axis.set_title(title, fontsize="small")
        axis.set_xlabel("step")
        axis.set_ylabel("keep ratio")
        axis.legend(fontsize="x-small")
    figure.savefig(path, dpi=DPI)


def plot_train_vs_val(runs: list[tuple[str, RunRecords]], path: str) -> None:
    """One panel per (title, run)."""
    figure, axes = _panel_grid(min(len(runs), MAX_PANELS))
    for axis, (title, run) in zip(axes, runs):
        key = regime_key(run.config.eval.select_keep_ratio)
        epochs = [r["epoch"] + 1 for r in run.epochs]
        axis.plot(epochs, [r["train_accuracy"] for r in run.epochs], marker=".", label="train (at the training rho)")
        evaluated = [r for r in run.epochs if "val" in r["eval"]]
        axis.plot([r["epoch"] + 1 for r in evaluated], [r["eval"]["val"][key] for r in evaluated], marker=".",
                  label=f"validation (keep {key})")
        if run.summary is not None and run.summary["selected"] is not None:
            axis.axvline(run.summary["selected"]["epoch"] + 1, color="grey", ls="--", lw=1, label="selected epoch")
        axis.set_title(title, fontsize="small")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize="x-small")
    figure.savefig(path, dpi=DPI)


def plot_inference_cost(bench: dict, path: str) -> None:
    """An exported model's test accuracy and batch-1 CPU latency per path against rho (`bench inference` JSON)."""
    regimes = sorted(bench["regimes"], key=lambda regime: regime["keep_ratio"])
    ratios = [regime["keep_ratio"] for regime in regimes]
    figure = Figure(figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    accuracy_axis, latency_axis = figure.subplots(1, 2)
    accuracy_axis.plot(ratios, [regime["accuracy"].get("test") for regime in regimes], marker="o")
    accuracy_axis.set_ylabel("test accuracy (exported checkpoint)")
    for name in ("dense", "masked", "skip_zeros"):
        latency_axis.plot(ratios, [regime["latency_ms"][name]["1"] for regime in regimes], marker="o", label=name)
    latency_axis.set_ylabel("CPU latency, batch 1 (ms, median)")
    latency_axis.legend(fontsize="x-small")
    setup = bench["setup"]
    for axis in (accuracy_axis, latency_axis):
        axis.set_xscale("log")
        axis.set_xticks(ratios, [f"{ratio:g}" for ratio in ratios])
        axis.minorticks_off()
        axis.set_xlabel("keep ratio (log scale)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{setup['model']} ({setup['scope']} scope): {setup['threads']} thread(s), load average "
                    f"{setup['load_average_1min'][0]:.1f}", fontsize="small")
    figure.savefig(path, dpi=DPI)
