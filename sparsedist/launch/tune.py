"""`sparsedist tune`: a Ray Tune sweep whose trials each run one Ray Train `TorchTrainer`.

Before anything launches, the base config, the search space and the metric are checked together
(`space.check_space`): one error lists every problem. Then `sweep.yaml` records what is swept, and a
Tuner runs `trial_driver` per sampled configuration (the Train V2 + Tune pattern: the trial is the
Train driver, its workers are separate actors sized by `scaling`). Every trial trains in its own run
directory <sweep_dir>/trials/<trial_id> (the train layout), ASHA stops trials on the per-epoch metric,
and `resume` restores the Tuner: finished trials are kept, unfinished ones continue from their last
checkpoint. At the end sweep.csv, summary.md and the HParams view are written (`report.sweep`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from sparsedist.config import Config, ScalingConfig, apply_overrides, load_source, validate
from sparsedist.data import prepare
from sparsedist.launch.cluster import RESOURCE_WAIT_S, ray_session
from sparsedist.launch.rundir import SUMMARY_FILE, prepare_run_dir
from sparsedist.launch.space import SearchSpace, SpaceError, check_space, parse_space
from sparsedist.launch.train import make_trainer, write_json_atomic
from sparsedist.report.runs import is_run_dir
from sparsedist.report.sweep import (SWEEP_FILE, TRIALS_DIR, Trial, read_sweep_file, read_trials, write_sweep_results,
                                     write_trial_file)

DEFAULT_METRIC = "eval/val/accuracy/keep_1.00"
TUNE_DIR = "tune"
# A trial actor only drives its Train run (the workers hold the scaling resources): it reserves a sliver
# of a CPU so that the drivers of concurrent trials never starve their own workers.
DRIVER_CPUS = 0.1
# ASHA: every trial gets at least one epoch; each rung keeps the better half.
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION_FACTOR = 2
SCHEDULERS = ("asha", "fifo")


class SweepError(RuntimeError):
    """The sweep directory cannot be used as asked (exists, nothing to resume, or resumed with another sweep)."""


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep samples and optimizes: stored as sweep.yaml and compared on resume."""

    base: dict[str, Any]  # the base config with --set applied, as plain data
    space: dict[str, Any]  # the search space as written
    metric: str = DEFAULT_METRIC
    mode: str = "max"  # "min" for a loss
    scheduler: str = "asha"
    num_samples: int = 1  # samples of the random dimensions; grids are crossed with every sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_spec(config: str, space_file: str, *, overrides: list[str] = (), metric: str = DEFAULT_METRIC,
               scheduler: str = "asha", num_samples: int = 1) -> SweepSpec:
    """A SweepSpec from the command line's inputs (a config file or preset, a space file, --set)."""
    if scheduler not in SCHEDULERS:
        raise SpaceError([("--scheduler", f"must be one of {', '.join(SCHEDULERS)}", scheduler)])
    if num_samples < 1:
        raise SpaceError([("--num-samples", "must be >= 1", num_samples)])
    try:
        space = yaml.safe_load(Path(space_file).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpaceError([(space_file, f"cannot read the search space: {error}", None)]) from None
    base = apply_overrides(load_source(config), list(overrides))
    mode = "min" if metric.endswith("loss") else "max"
    return SweepSpec(base=base, space=space, metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples)


def check_sweep(spec: SweepSpec) -> tuple[SearchSpace, list[Config]]:
    """The parsed space and its validated corner configs; ConfigError/SpaceError before any trial starts."""
    validate(spec.base)
    space = parse_space(spec.space)
    return space, check_space(space, spec.base, spec.metric)


def trial_config(spec: dict[str, Any], sampled: dict[str, Any], trial_id: str, sweep_dir: str) -> Config:
    """A trial's config: base, then its sampled values, then its own run name and directory."""
    data = apply_overrides(spec["base"], parse_space(spec["space"]).overrides(sampled))
    return validate(apply_overrides(data, {"run.name": trial_id, "run.run_dir": os.path.join(sweep_dir, TRIALS_DIR, trial_id)}))


def trial_driver(sampled: dict[str, Any], *, spec: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: train the sampled config through Ray Train, forwarding rank 0's epoch reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec, sampled, trial_id, sweep_dir)
    run_dir = cfg.run.run_dir
    # A restored trial finds its run directory and Ray Train resumes from its last registered checkpoint.
    cfg = prepare_run_dir(cfg, resume=is_run_dir(run_dir))
    write_trial_file(run_dir, trial_id, sampled)
    try:
        make_trainer(cfg, callbacks=[TuneReportCallback()], quiet=True).fit()
    except Exception as error:
        write_trial_file(run_dir, trial_id, sampled, error=f"{type(error).__name__}: {error}")
        raise
    # summary.json is written by `run_sweep` after the Tuner ends: ASHA stops every trial at its last
    # report (max_t), before code after fit() would run.


def write_completed_summaries(sweep_dir: str) -> None:
    """summary.json (the train layout's completion mark) for every trial that ran all its epochs."""
    for trial in read_trials(sweep_dir):
        path = os.path.join(trial.run.run_dir, SUMMARY_FILE)
        if trial.run.completed and not os.path.isfile(path):
            write_json_atomic(path, {**trial.run.summary, "run_dir": trial.run.run_dir})


def trial_dirname(trial) -> str:
    return trial.trial_id


def largest_scaling(configs: list[Config]) -> ScalingConfig:
    return max((c.scaling for c in configs), key=lambda s: (s.use_gpu, s.num_workers * s.cpus_per_worker))


def default_concurrency(scaling: ScalingConfig) -> int:
    """As many trials as the cluster fits at once (each: its workers plus its driver's sliver)."""
    import ray

    available = ray.cluster_resources()
    fits = [math.floor(available.get("CPU", 0) / (scaling.num_workers * scaling.cpus_per_worker + DRIVER_CPUS))]
    if scaling.use_gpu:
        fits.append(math.floor(available.get("GPU", 0) / scaling.num_workers))
    return max(1, min(fits))


def _open_sweep_dir(spec: SweepSpec, sweep_dir: str, resume: bool) -> None:
    stored_path = os.path.join(sweep_dir, SWEEP_FILE)
    if resume:
        if not os.path.isfile(stored_path):
            raise SweepError(f"nothing to resume: {sweep_dir} holds no {SWEEP_FILE}")
        stored = read_sweep_file(sweep_dir)
        differences = sorted(k for k in stored.keys() | spec.to_dict().keys() if stored.get(k) != spec.to_dict().get(k))
        if differences:
            raise SweepError(f"cannot resume {sweep_dir}: the sweep differs in {', '.join(differences)} "
                             "(resume with the same --config, --space, --set, --metric, --scheduler and --num-samples)")
        return
    if os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
        raise SweepError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, or choose another --sweep-dir")
    os.makedirs(sweep_dir, exist_ok=True)
    with open(stored_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec.to_dict(), handle, sort_keys=False)


def run_sweep(spec: SweepSpec, sweep_dir: str, *, max_concurrent: int | None = None, resume: bool = False,
              resource_wait_s: float = RESOURCE_WAIT_S) -> list[Trial]:
    """Run (or resume) the sweep in `sweep_dir`; returns its trials once sweep.csv and summary.md are written.

    Raises ConfigError/SpaceError (bad base, space or metric: nothing started), SweepError, ClusterError.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    space, corner_configs = check_sweep(spec)
    sweep_dir = os.path.abspath(sweep_dir)
    _open_sweep_dir(spec, sweep_dir, resume)
    # Once, here: data problems fail before any trial, and the trials find their files ready.
    for data in {c.data.model_dump_json(): c.data for c in corner_configs}.values():
        prepare(data)
    scaling = largest_scaling(corner_configs)
    trainable = tune.with_resources(partial(trial_driver, spec=spec.to_dict(), sweep_dir=sweep_dir), {"cpu": DRIVER_CPUS})
    tune_dir = os.path.join(sweep_dir, TUNE_DIR)
    with ray_session(scaling, resource_wait_s=resource_wait_s):
        if resume and tune.Tuner.can_restore(tune_dir):
            tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:  # a fresh sweep, or one interrupted before Tune saved any state
            max_epochs = max(c.train.epochs for c in corner_configs)
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=ASHA_GRACE_EPOCHS,
                                       reduction_factor=ASHA_REDUCTION_FACTOR)
                         if spec.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                param_space=space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                    # Seeded sampling: the same sweep samples the same configurations. (Tune ignores
                    # TuneConfig.max_concurrent_trials once a generator is given: the generator limits it.)
                    search_alg=BasicVariantGenerator(max_concurrent=max_concurrent or default_concurrency(scaling),
                                                     random_state=validate(spec.base).run.seed),
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_dir),
            )
        tuner.fit()
    write_completed_summaries(sweep_dir)
    return write_sweep_results(sweep_dir)
