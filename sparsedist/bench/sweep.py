"""Where a sweep trial's time goes: a real `run_sweep` of one-epoch smoke trials, one at a time, on the
embedded cluster, with every trial's timeline pieced together from what the sweep records anyway.

    start        Tune reports the trial started: its actor process is up and its modules are imported
    driver       the trial's driver has prepared the run directory: trial.json written
    worker       rank 0 starts training: attempts.jsonl `started_at` (Ray Train controller, worker group,
                 worker imports, checkpoint restore)
    result       Tune receives the epoch's report (loaders, the epoch, evaluation, checkpoint, forwarding)
    complete     Tune has the trial's end (Ray Train's shutdown: worker group, placement group, controller)
    next start   the next trial's actor is up (Tune scheduling, process start, imports)

`startup_s` is everything from `start` to `result` except the training epoch itself (`epoch_time_s`);
`per_trial_s` is the whole cycle from one trial's start to the next one's. The first trial also pays the
cluster's cold caches, so the figures of interest are those of the trials after it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable

from sparsedist.logging import read_jsonl
from sparsedist.rundir import ATTEMPTS_FILE, METRICS_FILE
from sparsedist.report.sweep import TRIAL_FILE, TRIALS_DIR

TARGET_STARTUP_S = 10.0  # per trial after the first, on a 2-core CPU machine
PHASES = ("driver_s", "train_start_s", "worker_to_result_s", "epoch_time_s", "teardown_s", "next_trial_s", "startup_s")


def trial_timelines(sweep_dir: str, events: list[tuple[str, str, float]]) -> list[dict]:
    """One row per trial, in start order: the phases of its timeline in seconds."""
    starts = {trial: at for event, trial, at in events if event == "start"}
    completions = {trial: at for event, trial, at in events if event == "complete"}
    first_results = {}
    for event, trial, at in events:
        if event == "result":
            first_results.setdefault(trial, at)
    order = sorted(starts, key=starts.get)
    rows = []
    for index, trial in enumerate(order):
        run_dir = os.path.join(sweep_dir, TRIALS_DIR, trial)
        driver = os.stat(os.path.join(run_dir, TRIAL_FILE)).st_mtime
        worker = read_jsonl(os.path.join(run_dir, ATTEMPTS_FILE))[0]["started_at"]
        epoch_s = sum(r["epoch_time_s"] for r in read_jsonl(os.path.join(run_dir, METRICS_FILE)) if r["kind"] == "epoch")
        next_start = starts[order[index + 1]] if index + 1 < len(order) else None
        rows.append({
            "trial": trial,
            "driver_s": driver - starts[trial],
            "train_start_s": worker - driver,
            "worker_to_result_s": first_results[trial] - worker,
            "epoch_time_s": epoch_s,
            "teardown_s": completions[trial] - first_results[trial],
            "next_trial_s": None if next_start is None else next_start - completions[trial],
            "startup_s": first_results[trial] - starts[trial] - epoch_s,
        })
    return rows


def format_table(result: dict) -> str:
    lines = [f"{'trial':>12} " + " ".join(f"{phase:>18}" for phase in PHASES)]
    for row in result["trials"]:
        cells = ["–" if row[phase] is None else f"{row[phase]:.1f}" for phase in PHASES]
        lines.append(f"{row['trial']:>12} " + " ".join(f"{cell:>18}" for cell in cells))
    after = result["after_first"]
    lines += ["", f"sweep of {len(result['trials'])} one-epoch trials: {result['sweep_s']:.0f} s; trials after the first: "
                  f"start-up {after['startup_s']:.1f} s (target <= {TARGET_STARTUP_S:.0f} s), teardown "
                  f"{after['teardown_s']:.1f} s, per trial {after['per_trial_s']:.1f} s"]
    return "\n".join(lines)


def run_sweep_benchmark(trials: int = 3, json_out: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the sweep, print the per-trial timeline, and return it (also as JSON to `json_out`)."""
    from sparsedist.launch.tune import run_sweep, sweep_spec

    if trials < 3:
        raise ValueError("the benchmark needs at least 3 trials (the first pays the cold start, two give a cycle)")
    with tempfile.TemporaryDirectory(prefix="sparsedist-bench-sweep-") as root:
        space = os.path.join(root, "space.yaml")
        with open(space, "w", encoding="utf-8") as handle:
            json.dump({"run.seed": {"grid": list(range(trials))}}, handle)  # JSON is YAML
        spec = sweep_spec("smoke", space, scheduler="fifo",
                          overrides=[f"data.root={os.path.join(root, 'data')}", "train.epochs=1"])
        events: list[tuple[str, str, float]] = []
        started = time.monotonic()
        run_sweep(spec, os.path.join(root, "sweep"), max_concurrent=1, events=events)
        rows = trial_timelines(os.path.join(root, "sweep"), events)
    later = rows[1:]
    starts = sorted(at for event, _, at in events if event == "start")
    result = {
        "setup": {"base": "smoke", "epochs": 1, "trials": trials, "max_concurrent": 1, "cpus": os.cpu_count(),
                  "load_average_1min": os.getloadavg()[0]},
        "sweep_s": time.monotonic() - started,
        "trials": rows,
        "after_first": {
            "startup_s": statistics.mean(r["startup_s"] for r in later),
            "teardown_s": statistics.mean(r["teardown_s"] for r in later),
            "per_trial_s": (starts[-1] - starts[1]) / (len(starts) - 2),
        },
        "target_startup_s": TARGET_STARTUP_S,
    }
    result["meets_target"] = result["after_first"]["startup_s"] <= TARGET_STARTUP_S
    log(format_table(result))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result
