"""One Tune trial (imported inside the trial's actor): the Train V2 + Tune pattern, where the trial is the
Ray Train driver and its workers are separate actors sized by the trial's `scaling`.

Reports. Rank 0's epoch metrics reach the trial through `forwarding` (a queue fed by a Ray Train
callback), and the trial's own thread reports them to Tune: that is what lets a report carry a Tune
checkpoint, which PBT needs.

PBT. The report of every perturbation epoch carries a hand-off: a copy of that epoch's Train checkpoint,
the run's metrics up to it, and whose it is. When PBT exploits, Tune restarts the trial with the mutated
config and the donor's hand-off; the trial's run directory then starts over as a new Ray Train run whose
state (weights, optimizer, schedule, the controller's rho and EMA) is the donor's (`run.init_from`) and
whose settings all come from the mutated config. A checkpoint holds state and never settings, so
restoring it cannot undo a mutation.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import nullcontext
from functools import partial
from typing import Any

from ray import tune
from ray.util.queue import Queue

from sparsedist import storage
from sparsedist.config import Config, apply_overrides, validate
from sparsedist.launch.forwarding import ForwardReports, fit_and_forward
from sparsedist.launch.space import parse_space
from sparsedist.launch.train import make_trainer, raise_run_error
from sparsedist.logging import flatten_epoch, read_jsonl
from sparsedist.report.runs import is_run_dir, read_run
from sparsedist.report.sweep import TRIALS_DIR, read_trial_file, write_trial_file
from sparsedist.rundir import METRICS_FILE, prepare_run_dir

HANDOFF_FILE = "handoff.json"  # {"trial_id", "epoch"}: whose state, after which epoch
HANDOFF_STATE_DIR = "state"  # the Train checkpoint of that epoch
START_DIR = "start"  # in an exploited trial's run directory: the donor's state it continued from


def trial_config(spec: dict[str, Any], sampled: dict[str, Any], trial_id: str, sweep_dir: str) -> Config:
    """A trial's config: base, then its sampled values, then its own run name and directory."""
    data = apply_overrides(spec["base"], parse_space(spec["space"]).overrides(sampled))
    run_dir = storage.join(sweep_dir, TRIALS_DIR, trial_id)
    return validate(apply_overrides(data, {"run.name": trial_id, "run.run_dir": run_dir}))


def write_handoff(directory: str, trial_id: str, run_dir: str, epoch: int, checkpoint: tune.Checkpoint) -> None:
    checkpoint.to_directory(os.path.join(directory, HANDOFF_STATE_DIR))  # from wherever Ray Train stored it
    records = [r for r in read_jsonl(storage.join(run_dir, METRICS_FILE)) if r["epoch"] <= epoch]
    with open(os.path.join(directory, METRICS_FILE), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)
    with open(os.path.join(directory, HANDOFF_FILE), "w", encoding="utf-8") as handle:
        json.dump({"trial_id": trial_id, "epoch": epoch}, handle)


def report_epoch(metrics: dict[str, Any], checkpoint: tune.Checkpoint | None, *, trial_id: str, run_dir: str,
                 handoff_every: int | None, epochs: int) -> None:
    """Report one epoch to Tune; under PBT, a perturbation epoch's report carries the hand-off, except the last
    epoch's: a finished run has nothing left to train, so continuing it would only copy its result."""
    epoch = metrics["epoch"]
    if handoff_every is None or checkpoint is None or (epoch + 1) % handoff_every or epoch + 1 == epochs:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="sparsedist-handoff-") as directory:
        write_handoff(directory, trial_id, run_dir, epoch, checkpoint)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))  # Tune copies it into its storage


def continue_donor(cfg: Config, handoff_dir: str, handoff: dict[str, Any], sampled: dict[str, Any],
                   exploits: list[dict[str, Any]]) -> Config:
    """PBT's exploit: the trial's run directory becomes a new run starting from the donor's state, with the
    donor's metrics history up to that epoch and this trial's (mutated) config."""
    run_dir = cfg.run.run_dir
    start = storage.join(run_dir, START_DIR)
    cfg = prepare_run_dir(validate(apply_overrides(cfg.to_dict(), {"run.init_from": start})), overwrite=True)
    storage.upload(os.path.join(handoff_dir, HANDOFF_STATE_DIR), start)
    storage.upload(os.path.join(handoff_dir, METRICS_FILE), storage.join(run_dir, METRICS_FILE))
    exploit = {"epoch": handoff["epoch"], "donor": handoff["trial_id"], "params": sampled}
    write_trial_file(run_dir, cfg.run.name, sampled, exploits=[*exploits, exploit])
    return cfg


def trial_driver(sampled: dict[str, Any], *, spec: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: train the sampled config through Ray Train, forwarding rank 0's epoch reports to Tune."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec, sampled, trial_id, sweep_dir)
    run_dir = cfg.run.run_dir
    exploits = (read_trial_file(run_dir) or {"exploits": []})["exploits"]
    checkpoint = tune.get_checkpoint()  # a hand-off: this trial's own (resume) or, after an exploit, the donor's
    with checkpoint.as_directory() if checkpoint is not None else nullcontext() as handoff_dir:
        handoff = None
        if handoff_dir is not None:
            with open(os.path.join(handoff_dir, HANDOFF_FILE), encoding="utf-8") as handle:
                handoff = json.load(handle)
        if handoff is not None and handoff["trial_id"] != trial_id:
            cfg = continue_donor(cfg, handoff_dir, handoff, sampled, exploits)
        elif (exists := is_run_dir(run_dir)) and (run := read_run(run_dir)).completed:
            # Interrupted after its last epoch but before Tune recorded the end: hand Tune the final result again.
            tune.report(flatten_epoch(run.epochs[-1]))
            return
        else:
            # A restored trial finds its run directory and Ray Train resumes from its last registered checkpoint.
            cfg = prepare_run_dir(cfg, resume=exists)
            write_trial_file(run_dir, trial_id, sampled, exploits=exploits)
    handoff_every = spec["perturbation_interval"] if spec["scheduler"] == "pbt" else None
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # Only the failure check follows: ASHA stops every trial at its last report (max_t), and a stopped
    # trial's fit() raises like a failed one. `run_sweep` writes summary.json and errors once the Tuner has ended.
    fit_and_forward(make_trainer(cfg, callbacks=[ForwardReports(queue)]), queue,
                    partial(report_epoch, trial_id=trial_id, run_dir=run_dir, handoff_every=handoff_every,
                            epochs=cfg.train.epochs))
    raise_run_error(run_dir)  # a deterministic failure the workers recorded instead of finishing
