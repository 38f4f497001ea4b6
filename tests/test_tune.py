"""`run_sweep`: bad input fails before any trial; a tiny ASHA sweep on a real local Ray cluster (127.0.0.1)
yields sweep.csv and summary.md, and eval and report run on its outputs; an Optuna sweep interrupted with
Ctrl-C resumes its trials; PBT's exploits continue the donor's weights."""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsedist.config import ConfigError
from sparsedist.rundir import METRICS_FILE, PIDS_DIR, SUMMARY_FILE
from sparsedist.launch.space import SpaceError
from sparsedist.launch.tune import SweepError, add_tune_arguments, run_sweep, sweep_spec, tune_from_args
from sparsedist.report.evaluate import add_eval_arguments, eval_from_args
from sparsedist.report.page import add_report_arguments, report_from_args
from sparsedist.report.sweep import CSV_FILE, SUMMARY_MD, TRIALS_DIR, read_trials
from tests.mlflow_server import mlflow_server

REPO = Path(__file__).resolve().parents[1]
TINY_SPACE = """
controller:
  grid: {dense: {strategy: dense}, smoke: {preset: smoke}}
run.seed: {grid: [0, 1]}
"""
# Two 1-worker trials at a time on 2 cores: half a CPU per worker leaves room for both and their drivers.
TINY_OVERRIDES = ["train.epochs=2", "scaling.cpus_per_worker=0.5", "data.loader_workers=1"]
SWEEP_SCRIPT = """
import json, sys
from sparsedist.launch.tune import run_sweep, sweep_spec
args = json.loads(sys.argv[1])
spec = sweep_spec("smoke", args["space"], overrides=args["overrides"], **args["spec"])
trials = run_sweep(spec, args["sweep_dir"], max_concurrent=args["max_concurrent"], resume=args["resume"])
print("SWEEP DONE", {t.trial_id: t.status for t in trials})
"""
SWEEP_TIMEOUT_S = 420


def write_space(directory: Path, text: str) -> str:
    path = directory / "space.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------- refused before any trial starts
@pytest.mark.parametrize("space_text, overrides, metric, fragment", [
    ("", [], "eval/val/accuracy/keep_1.00", "non-empty mapping"),
    ("controller.tighten: {uniform: [0.01, 0.1]}", [], "eval/val/accuracy/keep_1.00", "no such config path"),
    ("controller.keep_min: {uniform: [0.5, 1.5]}", [], "eval/val/accuracy/keep_1.00", "less than or equal to 1"),
    ("run.seed: {grid: [0, 1]}", [], "eval/val/accuracy/keep_0.10", "no trial reports this metric"),
    ("run.seed: {grid: [0, 1]}", ["data.val_fraction=0.0", "eval.selection=paper"], "eval/val/accuracy/keep_1.00",
     "needs a validation split"),
])
def test_bad_space_or_metric_is_one_error_before_anything_starts(tmp_path, space_text, overrides, metric, fragment):
    import ray

    spec = sweep_spec("smoke", write_space(tmp_path, space_text), overrides=overrides, metric=metric)
    with pytest.raises(SpaceError) as caught:
        run_sweep(spec, str(tmp_path / "sweep"))
    assert fragment in str(caught.value)
    assert not (tmp_path / "sweep").exists() and not ray.is_initialized()


def test_tune_command_reports_a_bad_space_and_exits_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    space = write_space(tmp_path, "controller.tighten: {uniform: [0.01, 0.1]}\nrun.seed: {grid: []}")
    args = parser.parse_args(["--config", "smoke", "--space", space, "--sweep-dir", str(tmp_path / "sweep")])
    assert tune_from_args(args) == 2
    message = capsys.readouterr().err
    assert message.startswith("invalid search space (2 errors)")
    assert "controller.tighten: no such config path; did you mean controller.tighten_pct" in message
    assert "run.seed: grid: expected a non-empty list" in message


def test_base_value_config_rejects_is_a_config_error(tmp_path):
    spec = sweep_spec("smoke", write_space(tmp_path, "run.seed: {grid: [0]}"), overrides=["train.epochs=0"])
    with pytest.raises(ConfigError, match="train.epochs"):
        run_sweep(spec, str(tmp_path / "sweep"))


def test_repeating_a_grid_only_space_is_refused(tmp_path):
    spec = sweep_spec("smoke", write_space(tmp_path, "run.seed: {grid: [0, 1]}"), num_samples=3)
    with pytest.raises(SpaceError, match="identical trials"):
        run_sweep(spec, str(tmp_path / "sweep"))


def test_unknown_scheduler_and_loss_metric_mode(tmp_path):
    space = write_space(tmp_path, "run.seed: {grid: [0]}")
    with pytest.raises(SpaceError, match="--scheduler"):
        sweep_spec("smoke", space, scheduler="hyperband")
    assert sweep_spec("smoke", space, metric="train/loss").mode == "min"


@pytest.mark.parametrize("space_text, scheduler", [
    ("run.seed: {grid: [0, 1]}\ncontroller.tighten_pct: {uniform: [0.01, 0.1]}", "fifo"),  # a seed study
    ("controller.tighten_pct: {grid: [0.01, 0.1]}\ncontroller.cooldown: {grid: [1, 2]}", "fifo"),  # grids only
    ("controller.tighten_pct: {uniform: [0.01, 0.1]}\ncontroller.cooldown: {grid: [1, 2]}", "asha"),
])
def test_seed_studies_and_grids_run_fifo_unless_asha_is_asked_for(tmp_path, space_text, scheduler):
    space = write_space(tmp_path, space_text)
    assert sweep_spec("smoke", space).scheduler == scheduler
    asked = sweep_spec("smoke", space, scheduler="asha", grace_period=2, reduction_factor=3)
    assert (asked.scheduler, asked.grace_period, asked.reduction_factor) == ("asha", 2, 3)


def test_asha_settings_are_refused_without_asha(tmp_path):
    space = write_space(tmp_path, "run.seed: {grid: [0, 1]}")
    with pytest.raises(SpaceError) as caught:
        sweep_spec("smoke", space, grace_period=2, reduction_factor=1)
    message = caught.value.format()
    assert "--grace-period: is a setting of --scheduler asha; the sweep's scheduler is fifo" in message
    assert "--reduction-factor: must be >= 2" in message


def test_pbt_mutates_controller_values_only_and_needs_a_checkpoint_every_perturbation(tmp_path):
    space = write_space(tmp_path, "controller.tighten_pct: {uniform: [0.01, 0.1]}\nrun.seed: {grid: [0, 1]}\n"
                                  "sparsity.scope: {choice: [layer, network]}\ncontroller.cooldown: {grid: [1, 2]}\n")
    spec = sweep_spec("smoke", space, scheduler="pbt", perturbation_interval=3,
                      overrides=["train.checkpoint_every_epochs=2"])
    assert spec.perturbation_interval == 3 and spec.grace_period is None
    with pytest.raises(SpaceError) as caught:
        run_sweep(spec, str(tmp_path / "sweep"))
    problems = {path: message for path, message, _ in caught.value.problems}
    assert set(problems) == {"sparsity.scope", "controller.cooldown", "train.checkpoint_every_epochs"}
    assert problems["sparsity.scope"].startswith("PBT mutates controller settings")
    assert "must divide --perturbation-interval 3" in problems["train.checkpoint_every_epochs"]
    assert not (tmp_path / "sweep").exists()
    assert sweep_spec("smoke", space, scheduler="pbt").perturbation_interval == 2  # the default


def test_pbt_explore_stays_inside_the_space():
    from sparsedist.launch.space import parse_space

    space = parse_space({"controller.tighten_pct": {"uniform": [0.01, 0.1]}, "controller.cooldown": {"randint": [0, 6]},
                         "controller.interval": {"choice": [2, 4]}, "run.seed": {"grid": [0, 1]}})
    assert set(space.mutations()) == {"controller.tighten_pct", "controller.cooldown", "controller.interval"}
    assert space.mutations()["controller.interval"] == [2, 4]  # lists: PBT shifts to a neighbour
    explored = {"controller.tighten_pct": 0.12, "controller.cooldown": 7, "controller.interval": 4, "run.seed": 1}
    assert space.clip(explored) == {"controller.tighten_pct": 0.1, "controller.cooldown": 5, "controller.interval": 4,
                                    "run.seed": 1}


def test_optuna_is_seeded_limited_and_refuses_grids(tmp_path):
    from sparsedist.launch.space import parse_space
    from sparsedist.launch.tune import make_search_alg

    space_text = "controller.tighten_pct: {loguniform: [0.005, 0.1]}\ncontroller.cooldown: {randint: [0, 6]}\n"
    spec = sweep_spec("smoke", write_space(tmp_path, space_text), search_alg="optuna")

    def suggestions(spec):
        search = make_search_alg(spec, concurrency=1)
        search.set_search_properties(spec.metric, spec.mode, parse_space(spec.space).to_tune())
        return search.suggest("first"), search.suggest("second")

    (first, blocked), (again, _) = suggestions(spec), suggestions(spec)
    assert blocked is None  # one trial at a time: the next waits for a result
    assert first == again and 0.005 <= first["controller.tighten_pct"] <= 0.1 and 0 <= first["controller.cooldown"] < 6
    reseeded, _ = suggestions(sweep_spec("smoke", write_space(tmp_path, space_text), search_alg="optuna",
                                         overrides=["run.seed=1"]))
    assert reseeded != first
    with pytest.raises(SpaceError, match="cannot cross a grid"):
        run_sweep(sweep_spec("smoke", write_space(tmp_path, space_text + "run.seed: {grid: [0, 1]}"),
                             search_alg="optuna"), str(tmp_path / "sweep"))
    with pytest.raises(SpaceError, match="PBT explores the settings itself"):
        sweep_spec("smoke", write_space(tmp_path, space_text), search_alg="optuna", scheduler="pbt")


def test_concurrency_beyond_the_embedded_cluster_is_refused_with_the_numbers():
    from sparsedist.config import ScalingConfig
    from sparsedist.launch.tune import trial_concurrency

    one_cpu, half_cpu = ScalingConfig(cpus_per_worker=1.0), ScalingConfig(cpus_per_worker=0.5)
    assert trial_concurrency(None, one_cpu, {"CPU": 2.0}, attached=False) == 1  # 2 / (1 + 0.1 driver)
    assert trial_concurrency(None, half_cpu, {"CPU": 2.0}, attached=False) == 3  # 2 / 0.6
    assert trial_concurrency(None, ScalingConfig(cpus_per_worker=1.0), {"CPU": 3.3}, attached=False) == 3
    with pytest.raises(SweepError) as caught:
        trial_concurrency(2, one_cpu, {"CPU": 2.0}, attached=False)
    assert str(caught.value) == ("2 trial(s) at once do not fit: each trial holds 1.1 CPUs (1 worker(s) x 1 CPU + 0.1 CPU "
                                 "for its driver) and the cluster has 2 CPUs, so 1 fit at once: pass --max-concurrent 1 "
                                 "or leave it out (the embedded cluster never grows)")
    with pytest.raises(SweepError, match="holds 2.1 CPUs .* so 0 fit at once: lower scaling.num_workers"):
        trial_concurrency(None, ScalingConfig(num_workers=2), {"CPU": 2.0}, attached=False)
    gpu = ScalingConfig(num_workers=2, use_gpu=True)
    with pytest.raises(SweepError, match="holds 2.1 CPUs and 2 GPUs .* has 16 CPUs and 2 GPUs, so 1 fit"):
        trial_concurrency(2, gpu, {"CPU": 16.0, "GPU": 2.0}, attached=False)


def test_concurrency_beyond_an_attached_cluster_is_a_warning():
    from sparsedist.config import ScalingConfig
    from sparsedist.launch.tune import trial_concurrency

    warnings = []
    assert trial_concurrency(4, ScalingConfig(), {"CPU": 2.0}, attached=True, warn=warnings.append) == 4
    assert warnings == ["warning: 4 trial(s) at once do not fit: each trial holds 1.1 CPUs (1 worker(s) x 1 CPU + 0.1 "
                        "CPU for its driver) and the cluster has 2 CPUs, so 1 fit at once; the others wait until the "
                        "cluster grows (autoscaler) or a trial ends"]


@pytest.mark.slow
def test_tune_command_refuses_more_trials_than_the_embedded_cluster_runs(tmp_path, capsys):
    import ray

    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    cpus = os.cpu_count()
    args = parser.parse_args(["--config", "smoke", "--space", write_space(tmp_path, "run.seed: {grid: [0, 1]}"),
                              "--sweep-dir", str(tmp_path / "sweep"), "--max-concurrent", str(cpus + 1),
                              "--set", f"data.root={tmp_path / 'data'}"])
    assert tune_from_args(args) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: {cpus + 1} trial(s) at once do not fit: each trial holds 1.1 CPUs"), message
    assert f"the cluster has {cpus} CPUs, so {int(cpus / 1.1 + 1e-9)} fit at once" in message
    assert not (tmp_path / "sweep").exists() and not ray.is_initialized()


def test_existing_sweep_needs_resume_and_resume_needs_the_same_sweep(tmp_path):
    space = write_space(tmp_path, "run.seed: {grid: [0]}")
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(sweep_spec("smoke", space), str(sweep_dir), resume=True)
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(json.dumps(sweep_spec("smoke", space).to_dict()))
    with pytest.raises(SweepError, match="already holds a sweep"):
        run_sweep(sweep_spec("smoke", space), str(sweep_dir))
    with pytest.raises(SweepError, match="differs in base"):
        run_sweep(sweep_spec("smoke", space, overrides=["train.epochs=3"]), str(sweep_dir), resume=True)


# ------------------------------------------------------------------------- the tiny sweep, on Ray
def launch_sweep(space: str, sweep_dir: Path, data_root: Path, resume: bool, spec: dict = {"scheduler": "asha"},
                 overrides: tuple[str, ...] = (), max_concurrent: int = 2) -> subprocess.Popen:
    args = {"space": space, "sweep_dir": str(sweep_dir), "resume": resume, "spec": spec, "max_concurrent": max_concurrent,
            "overrides": [f"data.root={data_root}", *TINY_OVERRIDES, *overrides]}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, json.dumps(args)], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def completed_trials(sweep_dir: Path) -> list[Path]:
    """Trial run directories whose metrics.jsonl holds the last (second) epoch."""
    done = []
    for metrics in sorted((sweep_dir / TRIALS_DIR).glob(f"*/{METRICS_FILE}")):
        if any(json.loads(line).get("kind") == "epoch" and json.loads(line)["epoch"] == 1 for line in metrics.open()):
            done.append(metrics.parent)
    return done


def trial_fingerprint(run_dir: Path) -> tuple:
    """What a rerun would change: the metrics history and the worker pid file of the attempt."""
    metrics = run_dir / METRICS_FILE
    return metrics.read_bytes(), metrics.stat().st_mtime_ns, (run_dir / PIDS_DIR / "rank0.pid").read_text()


def interrupt_and_resume(root: Path, space_text: str, trials: int, spec: dict, max_concurrent: int = 2,
                         overrides: tuple[str, ...] = ()) -> dict:
    """A sweep interrupted (SIGINT, as Ctrl-C) once a trial has finished, then resumed to its end."""
    space, sweep_dir, data_root = write_space(root, space_text), root / "sweep", root / "data"
    first = launch_sweep(space, sweep_dir, data_root, resume=False, spec=spec, max_concurrent=max_concurrent,
                         overrides=overrides)
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not completed_trials(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + first.stdout.read()[-5000:]
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0]
    finished_before = {d.name: trial_fingerprint(d) for d in completed_trials(sweep_dir)}
    params_before = {started.name: json.loads((started / "trial.json").read_text())["params"]
                     for started in (sweep_dir / TRIALS_DIR).iterdir()}
    assert finished_before and len(finished_before) < trials, output[-5000:]

    resumed_at = time.time()
    second = launch_sweep(space, sweep_dir, data_root, resume=True, spec=spec, max_concurrent=max_concurrent,
                          overrides=overrides)
    output = second.communicate(timeout=SWEEP_TIMEOUT_S)[0]
    assert second.returncode == 0 and "SWEEP DONE" in output, output[-5000:]
    return {"sweep_dir": sweep_dir, "finished_before": finished_before, "params_before": params_before,
            "resumed_at": resumed_at}


def sweep_to_the_end(root: Path, space_text: str, **launch) -> Path:
    """A sweep launched in `root` and run to its end: its sweep directory."""
    sweep = launch_sweep(write_space(root, space_text), root / "sweep", root / "data", resume=False, **launch)
    output = sweep.communicate(timeout=SWEEP_TIMEOUT_S)[0]
    assert sweep.returncode == 0 and "SWEEP DONE" in output, output[-5000:]
    return root / "sweep"


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory):
    """A 4-trial ASHA sweep, two trials at a time, run to its end (the Optuna sweep is the one interrupted)."""
    return sweep_to_the_end(tmp_path_factory.mktemp("tune"), TINY_SPACE, spec={"scheduler": "asha"})


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def resumed_optuna_sweep(tmp_path_factory, tracking_uri):
    """Two trials suggested by Optuna one after the other (FIFO), tracked in MLflow, interrupted once the first
    has finished, then resumed: Tune restores Optuna's study, which must suggest the second trial and no more."""
    return interrupt_and_resume(tmp_path_factory.mktemp("optuna"), "controller.tighten_pct: {loguniform: [0.01, 0.3]}\n",
                                trials=2, spec={"scheduler": "fifo", "search_alg": "optuna", "num_samples": 2},
                                max_concurrent=1, overrides=("tracking.backend=mlflow", f"tracking.uri={tracking_uri}",
                                                             "tracking.experiment=optuna-sweep"))


@pytest.mark.slow
def test_interrupted_optuna_sweep_resumes_its_trials_and_suggests_no_more(resumed_optuna_sweep):
    sweep_dir = resumed_optuna_sweep["sweep_dir"]
    trials = {t.trial_id: t for t in read_trials(str(sweep_dir))}
    assert len(trials) == 2 and {t.status for t in trials.values()} == {"completed"}
    for name, fingerprint in resumed_optuna_sweep["finished_before"].items():
        assert trial_fingerprint(sweep_dir / TRIALS_DIR / name) == fingerprint, f"{name} was rerun"
    for name, params in resumed_optuna_sweep["params_before"].items():
        assert trials[name].params == params  # a trial started before the interruption kept Optuna's suggestion
    values = [t.params["controller.tighten_pct"] for t in trials.values()]
    assert len(set(values)) == 2 and all(0.01 <= v <= 0.3 for v in values)


@pytest.mark.slow
def test_each_sweep_trial_is_one_mlflow_run_also_across_a_resume(resumed_optuna_sweep, tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("optuna-sweep").experiment_id])
    trials = {t.trial_id: t for t in read_trials(str(resumed_optuna_sweep["sweep_dir"]))}
    assert sorted(r.info.run_name for r in runs) == sorted(trials)
    for run in runs:
        trial = trials[run.info.run_name]
        assert run.info.status == "FINISHED" and float(run.data.params["controller.tighten_pct"]) == trial.params[
            "controller.tighten_pct"]
        final = trial.run.epochs[-1]
        assert run.data.metrics["eval/val/accuracy/keep_1.00"] == final["eval"]["val"]["1.00"]
        history = client.get_metric_history(run.info.run_id, "epoch/loss")
        assert max(m.step for m in history) == final["step"]
        assert {"config.yaml", "summary.json", "figures"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        if trial.trial_id in resumed_optuna_sweep["finished_before"]:  # ended and logged before the resume, once
            assert run.info.end_time / 1000 < resumed_optuna_sweep["resumed_at"]


@pytest.mark.slow
def test_tiny_sweep_writes_one_csv_row_per_trial_and_a_summary(asha_sweep):
    sweep_dir = asha_sweep
    with (sweep_dir / CSV_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["trial_id"] for r in rows) == sorted(p.name for p in (sweep_dir / TRIALS_DIR).iterdir())
    for row in rows:  # every trial ran at least the first ASHA rung (one epoch)
        epochs = [json.loads(line) for line in (sweep_dir / TRIALS_DIR / row["trial_id"] / METRICS_FILE).open()]
        assert any(r["kind"] == "epoch" for r in epochs), row["trial_id"]
    assert sorted((r["controller"], r["run.seed"]) for r in rows) == [("dense", "0"), ("dense", "1"), ("smoke", "0"), ("smoke", "1")]
    assert {r["status"] for r in rows} <= {"completed", "stopped"} and "completed" in {r["status"] for r in rows}
    for row in rows:
        run_dir = sweep_dir / TRIALS_DIR / row["trial_id"]
        assert (run_dir / SUMMARY_FILE).exists() == (row["status"] == "completed")
        assert 0 <= float(row["selected_test/keep_1.00"]) <= 1
    summary = (sweep_dir / SUMMARY_MD).read_text()
    assert "## Best configuration" in summary and "| controller=smoke |" in summary and "| controller=dense |" in summary


@pytest.mark.slow
def test_eval_reproduces_the_selected_checkpoint_accuracy_of_a_trial(asha_sweep, tmp_path, capsys):
    sweep_dir = asha_sweep
    with (sweep_dir / CSV_FILE).open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["status"] == "completed")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(sweep_dir / TRIALS_DIR / row["trial_id"]), "--device", "cpu",
                              "--keep-ratios", "1,0.5,0.2,0.1,0.05", "--json", str(tmp_path / "eval.json")])
    assert eval_from_args(args) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["checkpoint"].endswith("best") and evaluation["epoch"] == int(row["selected_epoch"])
    for key in ("1.00", "0.50", "0.20"):  # the grid the trial evaluated while training
        assert evaluation["accuracy"]["test"][key] == float(row[f"selected_test/keep_{key}"])
        assert evaluation["accuracy"]["val"][key] == float(row[f"selected_val/keep_{key}"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[3:]] == ["1.00", "0.50", "0.20", "0.10", "0.05"]


@pytest.mark.slow
def test_report_runs_on_the_sweep_outputs(asha_sweep, tmp_path):
    from matplotlib.image import imread

    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    assert report_from_args(parser.parse_args([str(asha_sweep), "--out", str(tmp_path)])) == 0
    for name in ("accuracy_vs_keep.png", "keep_trajectory.png", "train_vs_val.png"):
        assert imread(tmp_path / name)[..., :3].std() > 0.05, name
    assert "| controller=" in (tmp_path / "report.md").read_text()

# ------------------------------------------------------------------------------- PBT, on Ray
PBT_SPACE = "controller.tighten_pct: {uniform: [0.03, 0.3]}\n"
# Four epochs, a perturbation after each; keep_min 0.05 leaves rho room to move; no checkpoint rotated away.
PBT_OVERRIDES = ("train.epochs=4", "controller.keep_min=0.05", "run.checkpoints_to_keep=8")
# Tune's PBT is asynchronous: a trial is ranked against the scores the others reported so far, and it can
# only clone a trial that had saved as the top one when it last reported. Whether an exploit happens at all
# thus depends on the order the two trials report in (and on their overlapping: each starts its own Ray
# Train run, seconds apart, and trains for about two). The test is about what an exploit does, so the sweep
# is run again, from scratch, until one happened.
PBT_SWEEPS = 3


@pytest.fixture(scope="module")
def pbt_sweep(tmp_path_factory):
    """Two trials of the smoke controller under PBT, perturbed every epoch, with at least one exploit."""
    for _ in range(PBT_SWEEPS):
        sweep_dir = sweep_to_the_end(tmp_path_factory.mktemp("pbt"), PBT_SPACE, overrides=PBT_OVERRIDES,
                                     spec={"scheduler": "pbt", "perturbation_interval": 1, "num_samples": 2})
        if any(t.exploits for t in read_trials(str(sweep_dir))):
            break
    return sweep_dir


def replay_epoch(cfg, state):
    """The first epoch after `state`, trained here by the loop with `cfg`: its epoch record."""
    import torch

    from sparsedist.data import build_loaders
    from sparsedist.train.loop import train

    records = []

    class Stop(Exception):
        pass

    def stop(end):
        records.append(end.record)
        raise Stop

    loaders = build_loaders(cfg, epoch=state["epoch"] + 1)
    with pytest.raises(Stop):
        train(cfg, loaders, device=torch.device("cpu"), on_epoch_end=stop, resume_state=state)
    return records[0]


@pytest.mark.slow
def test_pbt_exploit_continues_the_donors_weights_under_the_mutated_controller_setting(pbt_sweep):
    import torch
    import yaml

    from sparsedist.config import Config, apply_overrides, validate
    from sparsedist.launch.trial import START_DIR
    from sparsedist.report.evaluate import evaluate_checkpoint
    from sparsedist.train.checkpoint import load_checkpoint

    trials = read_trials(str(pbt_sweep))
    exploited = [t for t in trials if t.exploits]
    assert len(trials) == 2 and exploited, f"PBT never exploited in {PBT_SWEEPS} sweeps: {[t.params for t in trials]}"
    for trial in exploited:
        run_dir = pbt_sweep / TRIALS_DIR / trial.trial_id
        exploit = trial.exploits[-1]  # the run directory holds the lineage since the last exploit
        epoch, mutated = exploit["epoch"], exploit["params"]["controller.tighten_pct"]
        start = str(run_dir / START_DIR)
        state = load_checkpoint(start)
        donor_cfg = Config.model_validate_json(state["config"])  # the donor's own config, saved with its state
        assert state["epoch"] == epoch and mutated != donor_cfg.controller.tighten_pct
        records = [json.loads(line) for line in (run_dir / METRICS_FILE).open()]
        after = [r for r in records if r["epoch"] > epoch]
        assert after and [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2, 3]

        # The mutated value is in force: every tightening after the exploit multiplies rho by 1 - mutated.
        steps = [r for r in after if r["kind"] == "step" and not r["skipped"]]
        tightened = [(a, b) for a, b in zip(steps, steps[1:]) if a["event"] == "tighten" and b["step"] == a["step"] + 2]
        assert tightened, [r["event"] for r in steps]
        for before, next_decision in tightened:
            assert next_decision["keep_ratio"] == pytest.approx(max(0.05, before["keep_ratio"] * (1 - mutated)), rel=1e-12)

        # The weights are the donor's: the state the trial started from scores what the donor logged at that
        # epoch (its history up to the exploit is the donor's metrics.jsonl).
        logged = next(r for r in records if r["kind"] == "epoch" and r["epoch"] == epoch)
        accuracy = evaluate_checkpoint(start, device=torch.device("cpu")).accuracy
        for split, key in (("val", "1.00"), ("test", "1.00"), ("test", "0.20")):
            assert accuracy[split][key] == logged["eval"][split][key], (split, key)

        # And the epoch after the exploit is one epoch from that state under the mutated config, not the donor's.
        cfg = validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        first_after = next(r for r in after if r["kind"] == "epoch")
        replayed = replay_epoch(cfg, state)
        assert (replayed["keep_ratio"], replayed["train_loss"]) == pytest.approx(
            (first_after["keep_ratio"], first_after["train_loss"]), rel=1e-6)
        assert replayed["eval"] == first_after["eval"]
        unmutated = replay_epoch(validate(apply_overrides(cfg.to_dict(), {
            "controller.tighten_pct": donor_cfg.controller.tighten_pct})), state)
        assert unmutated["keep_ratio"] != pytest.approx(first_after["keep_ratio"], rel=1e-6)


def test_only_trials_tune_counts_as_failed_get_an_error(tmp_path):
    from ray.air.result import Result

    from sparsedist.config import load_config
    from sparsedist.rundir import prepare_run_dir
    from sparsedist.launch.tune import record_trial_errors
    from sparsedist.report.sweep import write_trial_file

    for trial_id in ("a_00000", "a_00001"):
        run_dir = str(tmp_path / TRIALS_DIR / trial_id)
        prepare_run_dir(load_config("smoke", [f"run.run_dir={run_dir}"]))
        write_trial_file(run_dir, trial_id, {"run.seed": 0})
    failure = "ray.exceptions.RayTaskError(ValueError): ...\nTraceback ...\nValueError: the loss diverged"
    record_trial_errors(str(tmp_path), [
        Result(metrics={}, checkpoint=None, error=RuntimeError(failure), path=str(tmp_path / "tune" / "a_00000")),
        Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path / "tune" / "a_00001")),
    ])
    trials = {t.trial_id: t for t in read_trials(str(tmp_path))}
    assert (trials["a_00000"].status, trials["a_00000"].error) == ("error", "ValueError: the loss diverged")
    assert trials["a_00001"].error is None and trials["a_00000"].params == {"run.seed": 0}
