"""`sparsedist tune`: a Ray Tune sweep whose trials each run one Ray Train `TorchTrainer`.

Before anything launches, the base config, the search space and the metric are checked together
(`space.check_space`): one error lists every problem. Then `sweep.yaml` records what is swept, and a
Tuner runs `trial.trial_driver` per sampled configuration (the Train V2 + Tune pattern: the trial is the
Train driver, its workers are separate actors sized by `scaling`). Every trial trains in its own run
directory <sweep_dir>/trials/<trial_id> (the train layout); ASHA stops trials on the per-epoch metric,
FIFO runs them all to the end, PBT has the worst continue from the best with mutated controller settings;
and `resume` restores the Tuner: finished trials are kept, unfinished ones continue from their last
checkpoint. At the end sweep.csv, summary.md and the HParams view are written (`report.sweep`).
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import yaml

from sparsedist import storage
from sparsedist.config import (CONFIG_HELP, Config, ConfigError, ScalingConfig, add_config_arguments, apply_overrides,
                               load_sources, validate)
from sparsedist.data import DataUnavailableError, prepare
from sparsedist.launch.cluster import RESOURCE_WAIT_S, ClusterError, ray_session, required_resources
from sparsedist.rundir import SUMMARY_FILE
from sparsedist.tracking import log_outputs, require_backend
from sparsedist.launch.space import SearchSpace, SpaceError, check_space, parse_space
from sparsedist.launch.train import write_json_atomic
from sparsedist.report.sweep import (CSV_FILE, SEED_PATH, SUMMARY_MD, SWEEP_FILE, TENSORBOARD_DIR, TRIALS_DIR,
                                     TUNE_DIR, Trial, read_sweep_file, read_trials, record_trial_error, write_sweep_results)

DEFAULT_METRIC = "eval/val/accuracy/keep_1.00"
# A trial actor only drives its Train run (the workers hold the scaling resources): it reserves a sliver
# of a CPU so that the drivers of concurrent trials never starve their own workers.
DRIVER_CPUS = 0.1
# ASHA: by default every trial gets at least one epoch; each rung keeps the better half.
ASHA_GRACE_EPOCHS = 1
ASHA_REDUCTION_FACTOR = 2
# PBT: by default the population is compared, and its worst quarter exploits its best, every 2 epochs.
PBT_INTERVAL_EPOCHS = 2
SCHEDULERS = ("asha", "fifo", "pbt")
SEARCH_ALGS = ("random", "optuna")
# How a trial's MLflow run ends, by the trial's status.
TRACKING_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
# Each scheduler's own settings: SweepSpec field -> (flag, default, minimum).
SCHEDULER_SETTINGS = {
    "asha": {"grace_period": ("--grace-period", ASHA_GRACE_EPOCHS, 1),
             "reduction_factor": ("--reduction-factor", ASHA_REDUCTION_FACTOR, 2)},
    "pbt": {"perturbation_interval": ("--perturbation-interval", PBT_INTERVAL_EPOCHS, 1)},
}


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
    grace_period: int | None = None  # ASHA only: epochs before a trial can be stopped
    reduction_factor: int | None = None  # ASHA only: 1/reduction_factor of the trials go on at each rung
    perturbation_interval: int | None = None  # PBT only: epochs between exploit/explore decisions
    search_alg: str = "random"  # random (grids crossed with random samples) or optuna (TPE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_scheduler(space: Any) -> str:
    """FIFO for a seed study or a grid (a `run.seed` grid, or grids only): ASHA would cut seeds and slow-starting
    sparse arms early, and the statistics count completed trials only. ASHA for anything sampled."""
    dimensions = space if isinstance(space, dict) else {}
    grids = [path for path, spec in dimensions.items() if isinstance(spec, dict) and "grid" in spec]
    return "fifo" if dimensions and (SEED_PATH in grids or len(grids) == len(dimensions)) else "asha"


def sweep_spec(config: str | list[str], space_file: str, *, overrides: list[str] = (), metric: str = DEFAULT_METRIC,
               scheduler: str | None = None, num_samples: int = 1, grace_period: int | None = None,
               reduction_factor: int | None = None, perturbation_interval: int | None = None,
               search_alg: str = "random") -> SweepSpec:
    """A SweepSpec from the command line's inputs (config files or presets laid over one another, a space file,
    --set); without a
    scheduler, `default_scheduler` picks one from the space. A scheduler's settings take their defaults."""
    given = {"grace_period": grace_period, "reduction_factor": reduction_factor,
             "perturbation_interval": perturbation_interval}
    problems = []
    if scheduler is not None and scheduler not in SCHEDULERS:
        problems.append(("--scheduler", f"must be one of {', '.join(SCHEDULERS)}", scheduler))
    if num_samples < 1:
        problems.append(("--num-samples", "must be >= 1", num_samples))
    if search_alg not in SEARCH_ALGS:
        problems.append(("--search-alg", f"must be one of {', '.join(SEARCH_ALGS)}", search_alg))
    try:
        space = yaml.safe_load(Path(space_file).read_text())
    except (OSError, yaml.YAMLError) as error:
        problems.append((space_file, f"cannot read the search space: {error}", None))
        space = None
    scheduler = scheduler or default_scheduler(space)
    if search_alg == "optuna" and scheduler == "pbt":
        problems.append(("--search-alg", "PBT explores the settings itself: use --search-alg random with --scheduler pbt",
                         search_alg))
    settings = {}
    for owner, owned in SCHEDULER_SETTINGS.items():
        for field, (flag, default, minimum) in owned.items():
            value = given[field]
            if value is not None and value < minimum:
                problems.append((flag, f"must be >= {minimum}", value))
            elif value is not None and owner != scheduler:
                problems.append((flag, f"is a setting of --scheduler {owner}; the sweep's scheduler is {scheduler}", value))
            elif owner == scheduler:
                settings[field] = default if value is None else value
    if problems:
        raise SpaceError(problems)
    base = apply_overrides(load_sources(config), list(overrides))
    mode = "min" if metric.endswith("loss") else "max"
    return SweepSpec(base=base, space=space, metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                     search_alg=search_alg, **settings)


def check_sweep(spec: SweepSpec) -> tuple[SearchSpace, list[Config]]:
    """The parsed space and its validated corner configs; ConfigError/SpaceError before any trial starts."""
    validate(spec.base)
    space = parse_space(spec.space)
    if spec.search_alg == "optuna" and (grids := [d.path for d in space.dimensions if d.kind == "grid"]):
        raise SpaceError([(path, "Optuna suggests every value itself and cannot cross a grid: use choice", "grid")
                          for path in grids])
    if spec.num_samples > 1 and all(d.kind == "grid" for d in space.dimensions):
        # Seeded runs are deterministic: repeating a grid would count identical runs as independent samples.
        raise SpaceError([("--num-samples", "a space of grids only would repeat identical trials; sweep run.seed "
                                            "for repetitions", spec.num_samples)])
    configs = check_space(space, spec.base, spec.metric)
    if spec.scheduler == "pbt":
        pbt_problems = check_pbt(space, configs, spec.perturbation_interval)
        if pbt_problems:
            raise SpaceError(pbt_problems)
    return space, configs


def check_pbt(space: SearchSpace, configs: list[Config], interval: int) -> list[tuple[str, str, Any]]:
    """PBT mutates controller settings of one population: a trial continues another's checkpoint, so every
    trial must share the model, data and strategy (a run.seed grid lays out the population), and every
    perturbation epoch must have a checkpoint to hand over."""
    problems = []
    for dimension in space.dimensions:
        if dimension.path == SEED_PATH and dimension.kind == "grid":
            continue
        if (not dimension.path.startswith("controller.") or dimension.path == "controller.strategy"
                or dimension.kind == "grid" or dimension.labelled is not None):
            problems.append((dimension.path, "PBT mutates controller settings: sample single controller.* values "
                             "(not the strategy, a section or a grid); only run.seed may be a grid", dimension.kind))
    if not space.mutated:
        problems.append(("--space", "PBT needs at least one sampled controller.* value to mutate", space.paths))
    for every in sorted({c.train.checkpoint_every_epochs for c in configs if interval % c.train.checkpoint_every_epochs}):
        problems.append(("train.checkpoint_every_epochs", f"must divide --perturbation-interval {interval}: PBT hands "
                         "over the checkpoint of every perturbation epoch", every))
    return problems


def record_trial_errors(sweep_dir: str, results) -> None:
    """Put the error of every trial Tune counts as failed into its trial.json (Tune's verdict, not the
    driver's: see `trial.trial_driver`)."""
    for result in results:
        trial_id = os.path.basename(result.path)
        run_dir = storage.join(sweep_dir, TRIALS_DIR, trial_id)
        if result.error is not None:
            # A Ray task error's text is its traceback; the last line names the exception.
            record_trial_error(run_dir, str(result.error).strip().splitlines()[-1])


def write_completed_summaries(trials: list[Trial]) -> None:
    """summary.json (the train layout's completion mark) for every trial that ran all its epochs."""
    for trial in trials:
        path = storage.join(trial.run.run_dir, SUMMARY_FILE)
        if trial.run.completed and not storage.is_file(path):
            write_json_atomic(path, {**trial.run.summary, "run_dir": trial.run.run_dir})


def trial_dirname(trial) -> str:
    return trial.trial_id


def largest_scaling(configs: list[Config]) -> ScalingConfig:
    return max((c.scaling for c in configs), key=lambda s: (s.use_gpu, s.num_workers * s.cpus_per_worker))


def trial_cpus(scaling: ScalingConfig) -> float:
    """CPUs one trial holds while it runs: its workers plus its driver's sliver."""
    return scaling.num_workers * scaling.cpus_per_worker + DRIVER_CPUS


def trials_that_fit(scaling: ScalingConfig, resources: dict[str, float]) -> int:
    """How many trials of this scaling the cluster's resources run at once (0: not even one)."""
    need = {**required_resources(scaling), "CPU": trial_cpus(scaling)}
    # The epsilon keeps float quotients such as 3.3 / 1.1 = 2.9999999999999996 from flooring to 2.
    return min(math.floor(resources.get(kind, 0) / amount + 1e-9) for kind, amount in need.items())


def trial_concurrency(requested: int | None, scaling: ScalingConfig, resources: dict[str, float], *,
                      attached: bool, warn=partial(print, file=sys.stderr)) -> int:
    """Trials at once: `requested`, or as many as fit. More than fit is refused on the embedded cluster (the
    extra trials' worker groups would cycle through start-up time-outs until a slot frees) and only warned
    about on an attached cluster, whose autoscaler may add nodes."""
    fits = trials_that_fit(scaling, resources)
    if requested is not None and requested < 1:
        raise SweepError(f"--max-concurrent must be >= 1, got {requested}")
    if requested is None and fits >= 1:
        return fits
    wanted = requested or 1
    if wanted <= fits:
        return wanted
    need = f"{trial_cpus(scaling):g} CPUs" + (f" and {scaling.num_workers} GPUs" if scaling.use_gpu else "")
    have = f"{resources.get('CPU', 0):g} CPUs" + (f" and {resources.get('GPU', 0):g} GPUs" if scaling.use_gpu else "")
    problem = (f"{wanted} trial(s) at once do not fit: each trial holds {need} ({scaling.num_workers} worker(s) x "
               f"{scaling.cpus_per_worker:g} CPU + {DRIVER_CPUS:g} CPU for its driver) and the cluster has {have}, "
               f"so {fits} fit at once")
    if attached:
        warn(f"warning: {problem}; the others wait until the cluster grows (autoscaler) or a trial ends")
        return wanted
    remedy = f"pass --max-concurrent {fits} or leave it out" if fits else "lower scaling.num_workers or scaling.cpus_per_worker"
    raise SweepError(f"{problem}: {remedy} (the embedded cluster never grows)")


def refuse_relative_sweep_dir_on_cluster(sweep_dir: str) -> None:
    """A relative sweep directory on a cluster would resolve in the job's temporary directory on the
    driver's node: refused, as for run directories."""
    if storage.driver_local_on_cluster(sweep_dir):
        raise SweepError(f"--sweep-dir {sweep_dir} is relative (or unset) while attached to a cluster (RAY_ADDRESS): "
                         "give an absolute path on storage every node sees, or a URI such as s3://bucket/sweeps/<name>")


def check_sweep_dir(spec: SweepSpec, sweep_dir: str, resume: bool) -> None:
    """Refuse a sweep directory that holds another sweep, or a resume with nothing (or another sweep) to resume."""
    if resume:
        if not storage.is_file(storage.join(sweep_dir, SWEEP_FILE)):
            raise SweepError(f"nothing to resume: {sweep_dir} holds no {SWEEP_FILE}")
        stored = read_sweep_file(sweep_dir)
        differences = sorted(k for k in stored.keys() | spec.to_dict().keys() if stored.get(k) != spec.to_dict().get(k))
        if differences:
            raise SweepError(f"cannot resume {sweep_dir}: the sweep differs in {', '.join(differences)} (resume with "
                             "the same --config, --space, --set, --metric, --scheduler and its settings, --search-alg "
                             "and --num-samples)")
    elif storage.is_nonempty_dir(sweep_dir):
        raise SweepError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, or choose another --sweep-dir")


def write_sweep_file(spec: SweepSpec, sweep_dir: str) -> None:
    storage.write_bytes(storage.join(sweep_dir, SWEEP_FILE), yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())


def make_scheduler(spec: SweepSpec, space: SearchSpace, max_epochs: int):
    """Tune's trial scheduler; its time unit is the training iteration, one per epoch report."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=spec.grace_period,
                             reduction_factor=spec.reduction_factor)
    if spec.scheduler == "pbt":
        # Tune's explore scales ranges by 0.8 / 1.2 without regard to their bounds: `space.clip` puts them back.
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=spec.perturbation_interval,
                                       hyperparam_mutations=space.mutations(), custom_explore_fn=space.clip)
    return FIFOScheduler()


def make_search_alg(spec: SweepSpec, concurrency: int):
    """How the trials' configurations are chosen, seeded with the base's run.seed so that the same sweep
    samples the same configurations; it also limits how many trials run at once (Tune ignores
    TuneConfig.max_concurrent_trials once a search algorithm is given)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    seed = validate(spec.base).run.seed
    if spec.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TPE, Optuna's default sampler: each new trial is suggested from the results so far.
        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)


def run_sweep(spec: SweepSpec, sweep_dir: str, *, max_concurrent: int | None = None, resume: bool = False,
              resource_wait_s: float = RESOURCE_WAIT_S, events: list | None = None,
              on_trial_complete: Callable[[], None] | None = None) -> list[Trial]:
    """Run (or resume) the sweep in `sweep_dir`; returns its trials once sweep.csv and summary.md are written.
    `events`, when given, receives (event, trial_id, wall time) for every trial start, result and completion;
    `on_trial_complete` is called in the driver after each trial ends (partial results).

    Raises ConfigError/SpaceError (bad base, space or metric: nothing started), SweepError, ClusterError.
    """
    space, corner_configs = check_sweep(spec)
    refuse_relative_sweep_dir_on_cluster(sweep_dir)
    sweep_dir = storage.absolute(sweep_dir)
    storage.check_usable(sweep_dir)
    check_sweep_dir(spec, sweep_dir, resume)
    for corner in corner_configs:
        require_backend(corner)
    scaling = largest_scaling(corner_configs)
    # Tune's own state lives in the sweep directory too, on whatever filesystem holds it.
    sweep_path, filesystem = storage.ray_storage(sweep_dir)
    tune_dir = posixpath.join(sweep_path, TUNE_DIR)
    with ray_session(scaling, resource_wait_s=resource_wait_s):
        import ray  # only now: an embedded cluster's loopback environment must be set before Ray's first import
        from ray import tune

        from sparsedist.launch.timeline import TrialEnd, TrialTimeline  # these import Ray: only once ray_session has set
        from sparsedist.launch.trial import trial_driver  # its environment

        concurrency = trial_concurrency(max_concurrent, scaling, ray.cluster_resources(),
                                        attached=bool(os.environ.get("RAY_ADDRESS")))
        if not resume:  # written only once the sweep can run: a refused launch leaves no directory to --resume
            write_sweep_file(spec, sweep_dir)
        # Once, here: data problems fail before any trial, and the trials find their files ready.
        for data in {c.data.model_dump_json(): c.data for c in corner_configs}.values():
            prepare(data)
        trainable = tune.with_resources(partial(trial_driver, spec=spec.to_dict(), sweep_dir=sweep_dir),
                                        {"cpu": DRIVER_CPUS})
        callbacks = ([TrialTimeline(events)] if events is not None else []) + (
            [TrialEnd(on_trial_complete)] if on_trial_complete is not None else [])
        if resume and tune.Tuner.can_restore(tune_dir, storage_filesystem=filesystem):
            # The callbacks come back with the run config Tune saved (tuner.pkl): they must pickle.
            tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=filesystem)
        else:  # a fresh sweep, or one interrupted before Tune saved any state
            scheduler = make_scheduler(spec, space, max_epochs=max(c.train.epochs for c in corner_configs))
            tuner = tune.Tuner(
                trainable,
                param_space=space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                    search_alg=make_search_alg(spec, concurrency),
                    trial_dirname_creator=trial_dirname,
                    # Not reuse_actors: a trial that is stopped or paused (ASHA, PBT) must take its Train run with
                    # it, and only the end of its driver's process ends the Train controller it owns.
                ),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=sweep_path, storage_filesystem=filesystem,
                                          callbacks=callbacks),
            )
        results = tuner.fit()
    record_trial_errors(sweep_dir, results)
    trials = read_trials(sweep_dir)  # once: each read is every trial's config and history
    write_completed_summaries(trials)
    for trial in trials:
        log_outputs(trial.run.config, status=TRACKING_STATUS[trial.status])
    return write_sweep_results(sweep_dir, trials)


# ------------------------------------------------------------------------------------ command
def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sparsedist tune` flags."""
    add_config_arguments(parser, required=True, help="base config: " + CONFIG_HELP)
    parser.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="samples of the random dimensions; grid dimensions are crossed with each (default 1)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: as many as the cluster fits by each trial's scaling; more than "
                             "fit is refused on the embedded cluster, warned about on an attached one)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="asha (early stopping), fifo (every trial to the end) or pbt (population-based training "
                             "over controller settings); default: fifo for a space with a run.seed grid or of grids "
                             "only (seed studies), else asha")
    parser.add_argument("--search-alg", choices=SEARCH_ALGS, default="random",
                        help="random: grids crossed with seeded random samples (default); optuna: Optuna's TPE suggests "
                             "each trial from the results so far (no grids)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help=f"ASHA: epochs every trial runs before it can be stopped (default {ASHA_GRACE_EPOCHS})")
    parser.add_argument("--reduction-factor", type=int, default=None,
                        help=f"ASHA: 1 in this many trials goes on at each rung (default {ASHA_REDUCTION_FACTOR})")
    parser.add_argument("--perturbation-interval", type=int, default=None,
                        help=f"PBT: epochs between exploit/explore decisions (default {PBT_INTERVAL_EPOCHS})")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"per-epoch metric to optimize (default {DEFAULT_METRIC})")
    parser.add_argument("--sweep-dir", help="sweep directory (default: ./sweeps/<space file name>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in the sweep directory")


def tune_from_args(args: argparse.Namespace) -> int:
    """Run `tune` for parsed arguments; print where the results are, or a one-paragraph error."""
    sweep_dir = args.sweep_dir or os.path.join("sweeps", Path(args.space).stem)
    try:
        spec = sweep_spec(args.config, args.space, overrides=args.overrides, metric=args.metric, scheduler=args.scheduler,
                          num_samples=args.num_samples, grace_period=args.grace_period,
                          reduction_factor=args.reduction_factor, perturbation_interval=args.perturbation_interval,
                          search_alg=args.search_alg)
        trials = run_sweep(spec, sweep_dir, max_concurrent=args.max_concurrent, resume=args.resume)
    except ConfigError as error:  # SpaceError included
        print(error.format(), file=sys.stderr)
        return 2
    except (SweepError, ClusterError, DataUnavailableError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sweep_dir = storage.absolute(sweep_dir)
    statuses = [t.status for t in trials]
    print(f"{len(trials)} trials: " + ", ".join(f"{statuses.count(s)} {s}" for s in ("completed", "stopped", "error")))
    print(f"results:     {storage.join(sweep_dir, CSV_FILE)}\n             {storage.join(sweep_dir, SUMMARY_MD)}")
    print(f"TensorBoard: tensorboard --logdir {storage.join(sweep_dir, TENSORBOARD_DIR)} --host 127.0.0.1")
    print(f"report:      sparsedist report {sweep_dir}")
    return 0
