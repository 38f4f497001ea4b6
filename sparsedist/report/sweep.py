"""A sweep's results: its trials' run directories grouped across seeds, as sweep.csv, summary.md and a
TensorBoard HParams view.

    <sweep_dir>/sweep.yaml            what was swept (base config, space, metric, scheduler); resume checks it
               trials/<trial_id>/     one run directory per trial (the train layout) plus trial.json
               tune/                  Ray Tune's experiment state (resume)
               sweep.csv, summary.md  written when the sweep ends
               tensorboard/<trial_id>/  one HParams run per trial: sampled values and results

A group is the trials whose sampled values agree on everything but `run.seed`. Every group is compared
with its dense reference: the group that trains dense (`controller.strategy: dense`) and agrees with it
on every sampled value outside `controller` (so Strategy 2 in network scope is compared with dense in
network scope). Statistics use completed trials only: a trial the scheduler stopped early is a
truncated run, not a sample of the full-length result; summary.md counts, per group, the trials that
leaves out. Welch's p-values are Holm-corrected over the keep ratios a group is compared at.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from sparsedist import storage
from sparsedist.config import regime_key
from sparsedist.logging import flatten_epoch, flatten_hparams
from sparsedist.report.runs import RunRecords, read_run, selected_test
from sparsedist.report.stats import ACCURACY_BOUNDS, GroupStats, group_stats, holm, welch_t_test

SWEEP_FILE = "sweep.yaml"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
CSV_FILE = "sweep.csv"
SUMMARY_MD = "summary.md"
TUNE_DIR = "tune"  # Tune's own state (trial snapshots, PBT hand-offs)
TENSORBOARD_DIR = "tensorboard"
SEED_PATH = "run.seed"


@dataclass
class Trial:
    trial_id: str
    params: dict[str, Any]  # sampled values as Tune returned them (labels for labelled options)
    error: str | None
    run: RunRecords
    # PBT: every time this trial continued another's checkpoint: {"epoch", "donor", "params"} (params after it)
    exploits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        # Not complete and not failed: the scheduler stopped it early (after a resume nothing else is left).
        return "completed" if self.run.completed else "stopped"


@dataclass
class Group:
    params: dict[str, Any]  # the sampled values shared by the group (all but run.seed)
    trials: list[Trial]

    @property
    def label(self) -> str:
        return ", ".join(f"{path}={_text(value)}" for path, value in self.params.items()) or "all trials"

    @property
    def dense(self) -> bool:
        return self.trials[0].run.config.controller.strategy == "dense"

    @property
    def completed(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "completed"]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


# ------------------------------------------------------------------------------------ reading
def write_trial_file(run_dir: str, trial_id: str, params: dict[str, Any], error: str | None = None,
                     exploits: Iterable[dict[str, Any]] = ()) -> None:
    data = {"trial_id": trial_id, "params": params, "error": error, "exploits": list(exploits)}
    storage.write_bytes(storage.join(run_dir, TRIAL_FILE), json.dumps(data, indent=2).encode())


def read_trial_file(run_dir: str) -> dict[str, Any] | None:
    """A trial's trial.json, None when the trial has none (read, not checked first: one request less on S3)."""
    try:
        # trial.json of older sweeps has no exploits
        return {"exploits": [], **json.loads(storage.read_bytes(storage.join(run_dir, TRIAL_FILE)))}
    except FileNotFoundError:
        return None


def record_trial_error(run_dir: str, error: str) -> None:
    """Put `error` into a trial's trial.json, if it has one."""
    data = read_trial_file(run_dir)
    if data is None:
        return
    write_trial_file(run_dir, data["trial_id"], data["params"], error=error, exploits=data["exploits"])


def read_sweep_file(sweep_dir: str) -> dict[str, Any]:
    return yaml.safe_load(storage.read_bytes(storage.join(sweep_dir, SWEEP_FILE)))


def read_trials(sweep_dir: str) -> list[Trial]:
    """Every trial that started, in trial-id order (the sweep directory: a path or a storage URI)."""
    root = storage.join(sweep_dir, TRIALS_DIR)
    trials = []
    for name in storage.list_dir(root):
        run_dir = storage.join(root, name)
        if (data := read_trial_file(run_dir)) is not None:
            trials.append(Trial(data["trial_id"], data["params"], data["error"], read_run(run_dir), data["exploits"]))
    return trials


def group_trials(trials: Iterable[Trial]) -> list[Group]:
    groups: dict[str, Group] = {}
    for trial in trials:
        params = {path: value for path, value in trial.params.items() if path != SEED_PATH}
        groups.setdefault(json.dumps(params, sort_keys=True), Group(params, [])).trials.append(trial)
    return list(groups.values())


def dense_reference(group: Group, groups: list[Group]) -> Group | None:
    """The dense group agreeing with `group` on every sampled value outside `controller`."""
    def outside_controller(g: Group) -> dict[str, Any]:
        return {p: v for p, v in g.params.items() if p != "controller" and not p.startswith("controller.")}

    return next((g for g in groups if g.dense and outside_controller(g) == outside_controller(group)), None)


def best_metric(run: RunRecords, metric: str, mode: str) -> float | None:
    """The best value of `metric` over the run's epochs (what ASHA and the ranking look at)."""
    values = [flat[metric] for flat in map(flatten_epoch, run.epochs) if metric in flat]
    return (max if mode == "max" else min)(values) if values else None


def regime_keys(trials: Iterable[Trial]) -> list[str]:
    keys = {key for t in trials for key in (t.run.summary["final"]["test"] if t.run.summary else {})}
    return sorted(keys, key=float, reverse=True)


# ------------------------------------------------------------------------------------ writing
def write_sweep_csv(trials: list[Trial], path: str, metric: str, mode: str) -> None:
    """One row per trial: sampled values, final and validation-selected per-regime accuracy, status."""
    param_paths = list(dict.fromkeys(p for t in trials for p in t.params))
    keys = regime_keys(trials)
    columns = ["trial_id", "status", "epochs_completed", *param_paths, f"best {metric}", "selected_epoch"]
    for prefix in ("final_val", "final_test", "selected_val", "selected_test"):
        columns += [f"{prefix}/keep_{key}" for key in keys]
    columns += ["final_keep_ratio", "mean_realized_keep", "error"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for trial in trials:
            summary = trial.run.summary
            row = {"trial_id": trial.trial_id, "status": trial.status, "error": trial.error or "",
                   "epochs_completed": len(trial.run.epochs), f"best {metric}": best_metric(trial.run, metric, mode),
                   **{p: _text(trial.params[p]) if p in trial.params else "" for p in param_paths}}
            if summary is not None:
                selected = summary["selected"] or {}
                row.update(selected_epoch=selected.get("epoch"), final_keep_ratio=summary["keep_ratio"]["final"],
                           mean_realized_keep=summary["keep_ratio"]["realized_mean"])
                tables = {"final_val": summary["final"]["val"], "final_test": summary["final"]["test"],
                          "selected_val": selected.get("val"), "selected_test": selected.get("test")}
                for prefix, table in tables.items():
                    row.update({f"{prefix}/keep_{key}": value for key, value in (table or {}).items()})
            writer.writerow(row)


def _selected_values(group: Group, key: str) -> list[float]:
    """The selected checkpoint's test accuracy at keep ratio `key`, one value per completed trial."""
    return [selected_test(t.run)[key] for t in group.completed if key in selected_test(t.run)]


def _welch_p_values(group: Group, groups: list[Group], keys: list[str]) -> list[float] | str:
    """Welch's p against the group's dense reference at every keep ratio, or why there is no test."""
    if group.dense:
        return "reference"
    reference = dense_reference(group, groups)
    if reference is None:
        return "no dense group"
    return [welch_t_test(_selected_values(group, key), _selected_values(reference, key)).p_value for key in keys]


def _statistics_tables(groups: list[Group], keys: list[str]) -> list[str]:
    """Per keep ratio, one row per group; Holm's correction runs over a group's keep ratios (its family)."""
    tests = [_welch_p_values(group, groups, keys) for group in groups]
    corrected = [holm(p) if isinstance(p, list) else p for p in tests]
    lines = []
    for index, key in enumerate(keys):
        lines += ["", f"### keep ratio {key}", "",
                  "| group | n | mean | std | 95% CI | Welch p vs dense | Holm p |", "|---|---:|---:|---:|---|---:|---:|"]
        for group, p_values, holm_values in zip(groups, tests, corrected):
            values = _selected_values(group, key)
            if not values:
                lines.append(f"| {group.label} | 0 | – | – | – | – | – |")
                continue
            stats = group_stats(values, bounds=ACCURACY_BOUNDS)
            p_cells = ((_number(p_values[index]), _number(holm_values[index])) if isinstance(p_values, list)
                       else (p_values, p_values))
            lines.append(f"| {group.label} | {stats.n} | {_number(stats.mean)} | {_number(stats.std)} | "
                         f"[{_number(stats.ci_low)}, {_number(stats.ci_high)}] | {p_cells[0]} | {p_cells[1]} |")
    return lines


def _status_table(groups: list[Group]) -> list[str]:
    lines = ["| group | trials | completed | stopped early | failed |", "|---|---:|---:|---:|---:|"]
    for group in groups:
        statuses = [t.status for t in group.trials]
        lines.append(f"| {group.label} | {len(statuses)} | {statuses.count('completed')} | {statuses.count('stopped')} | "
                     f"{statuses.count('error')} |")
    return lines


def _best_lines(groups: list[Group], metric: str, mode: str) -> list[str]:
    pick = max if mode == "max" else min
    scored = [(t, best_metric(t.run, metric, mode)) for g in groups for t in g.trials]
    scored = [(t, v) for t, v in scored if v is not None]
    if not scored:
        return ["No trial reported the metric yet."]
    group_means: list[tuple[Group, GroupStats]] = []
    for group in groups:
        values = [v for t in group.completed if (v := best_metric(t.run, metric, mode)) is not None]
        if values:
            # An accuracy metric's interval stays inside [0, 1]; other metrics (loss, speed) are not clipped.
            group_means.append((group, group_stats(values, bounds=ACCURACY_BOUNDS if "accuracy" in metric else None)))
    lines = []
    if group_means:
        group, stats = pick(group_means, key=lambda pair: pair[1].mean)
        lines.append(f"Best group by mean `{metric}` over its completed trials: **{group.label}** "
                     f"(mean {_number(stats.mean)}, n = {stats.n}, 95% CI [{_number(stats.ci_low)}, {_number(stats.ci_high)}]).")
    trial, value = pick(scored, key=lambda pair: pair[1])
    params = ", ".join(f"`{p}={_text(v)}`" for p, v in trial.params.items())
    lines.append(f"Best single trial: `{trial.trial_id}` ({trial.status}), `{metric}` = {_number(value)}: {params}.")
    return lines


def write_summary_md(trials: list[Trial], path: str, metric: str, mode: str, title: str) -> None:
    """The best configuration, trial counts per group (stopped and failed ones included), then per regime
    and group: n, mean, std, 95% CI, Welch p against dense and its Holm correction."""
    groups = group_trials(trials)
    counts = {status: sum(t.status == status for t in trials) for status in ("completed", "stopped", "error")}
    select = {regime_key(t.run.config.eval.select_keep_ratio) for t in trials}
    keys = regime_keys(trials)
    lines = [
        f"# Sweep {title}", "",
        f"{len(trials)} trials: {counts['completed']} completed, {counts['stopped']} stopped early by the scheduler, "
        f"{counts['error']} failed. Sweep metric: `{metric}` ({mode}).", "",
        "## Best configuration", "", *_best_lines(groups, metric, mode), "",
        "## Trials per group", "",
        "The statistics below use completed trials only: a trial the scheduler stopped early is a truncated run, "
        "and a failed one has no result. Here is how many of each group that leaves out.", "",
        *_status_table(groups), "",
        "## Test accuracy of the selected checkpoint, per keep ratio", "",
        f"The selected checkpoint is each trial's epoch with the best validation accuracy (test accuracy under "
        f"eval.selection paper: best-on-test, optimistic) at keep ratio "
        f"{', '.join(sorted(select))} (eval.select_keep_ratio). Across seeds: n, mean, sample std, Student-t 95% "
        "interval of the mean (clipped to [0, 1]), the two-sided Welch's t-test p-value against the dense group with "
        f"the same non-controller values, and that p-value Holm-corrected over the {len(keys)} keep ratios compared "
        "for the group (family-wise error 5% when the Holm p is below 0.05).",
        *_statistics_tables(groups, keys),
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def write_sweep_hparams(trials: list[Trial], log_dir: str, metric: str, mode: str) -> None:
    """One TensorBoard run per trial holding its sampled values and results (the HParams dashboard)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(log_dir, ignore_errors=True)  # derived from the trials: rewritten whole on every write
    for trial in trials:
        results = {f"sweep/best/{metric}": best_metric(trial.run, metric, mode),
                   **{f"sweep/selected_test/keep_{k}": v for k, v in selected_test(trial.run).items()}}
        results = {tag: value for tag, value in results.items() if value is not None}
        with SummaryWriter(os.path.join(log_dir, trial.trial_id)) as writer:
            # run_name="." keeps the hparams in this trial's run instead of a timestamped sub-run.
            writer.add_hparams({**flatten_hparams(trial.params), "status": trial.status}, results, run_name=".")


def write_sweep_results(sweep_dir: str, trials: list[Trial] | None = None) -> list[Trial]:
    """sweep.csv, summary.md and the HParams view of a sweep directory, from its trials' run directories
    (`trials`, when the caller has just read them)."""
    sweep = read_sweep_file(sweep_dir)
    metric, mode = sweep["metric"], sweep["mode"]
    trials = read_trials(sweep_dir) if trials is None else trials
    local = storage.working_dir(sweep_dir, "sweeps")  # written here, then uploaded when the sweep is in storage
    name = storage.parent_and_name(sweep_dir)[1]
    write_sweep_csv(trials, os.path.join(local, CSV_FILE), metric, mode)
    write_summary_md(trials, os.path.join(local, SUMMARY_MD), metric, mode, name)
    write_sweep_hparams(trials, os.path.join(local, TENSORBOARD_DIR), metric, mode)
    if storage.is_uri(sweep_dir):
        # The HParams view is rewritten whole: the bucket's earlier event files would show each trial twice.
        storage.delete_dir(storage.join(sweep_dir, TENSORBOARD_DIR))
        for result in (CSV_FILE, SUMMARY_MD, TENSORBOARD_DIR):
            storage.upload(os.path.join(local, result), storage.join(sweep_dir, result))
    return trials
