"""`sparsedist reproduce` end to end on CPU with a miniature configuration: two paper arms x two seeds
under the paper's selection rule as a real Tune sweep on a local Ray (127.0.0.1), then paper_table.md
checked against the trials' own metrics.jsonl. The held-out rule's table is the same code over other
trials; its split is held to the presets by test_protocol."""

import argparse
import json
import re

import pytest
from scipy import stats as scipy_stats

from sparsedist.launch.reproduce import add_reproduce_arguments, reproduce_from_args
from sparsedist.report.reproduction import FIGURE_FILE, TABLE_FILE, paper_table
from sparsedist.report.sweep import TRIALS_DIR, read_sweep_file, read_trials

# The paper presets shrunk to seconds: synthetic 16x16 data, WRN-10-1, 2 epochs; everything else (the
# arms' controllers, fp16 loss scaling, the per-epoch cosine, both selection rules) as they are.
MINIATURE = ["data.dataset=synthetic", "data.synthetic.train_size=320", "data.synthetic.test_size=64",
             "data.synthetic.num_classes=4", "data.synthetic.image_size=16", "data.loader_workers=1",
             "model.depth=10", "model.widen_factor=1", "train.epochs=2", "train.batch_size=64",
             "eval.keep_ratios=[1.0, 0.5]", "eval.batch_size=64", "scaling.cpus_per_worker=0.4"]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_reproduce_arguments(parser)
    return parser.parse_args(argv)


def best_on_test(metrics_path, key):
    """The paper rule from the raw records: test accuracy at `key` of the epoch with the best dense test accuracy
    (the first one on a tie)."""
    epochs = [json.loads(line) for line in open(metrics_path) if '"kind": "epoch"' in line]
    best = max(epochs, key=lambda e: (e["eval"]["test"]["1.00"], -e["epoch"]))
    return best["eval"]["test"][key]


@pytest.mark.slow
def test_reproduce_runs_the_arms_under_a_rule_and_tables_them_with_intervals(tmp_path):
    sweep_dir = tmp_path / "reproduce"
    # Dense and Strategy 2 (Strategy 1's preset is held against the script by test_protocol) under the paper
    # rule: 4 trials at once (each 0.4 CPU for its worker and 0.1 for its driver).
    argv = ["--seeds", "2", "--arms", "dense,strategy2", "--selection", "paper", "--sweep-dir", str(sweep_dir),
            "--max-concurrent", "4"]
    for override in MINIATURE:
        argv += ["--set", override]
    assert reproduce_from_args(parse(argv)) == 0

    trials = read_trials(str(sweep_dir))
    assert len(trials) == 4 and all(t.status == "completed" for t in trials)
    assert {(t.params["controller"], t.params["eval.selection"], t.params["run.seed"]) for t in trials} == {
        (arm, "paper", seed) for arm in ("dense", "strategy2") for seed in (3407, 3408)}
    for trial in trials:  # each arm is its preset as it is; the paper rule trains on every image
        config = trial.run.config
        assert config.data.val_fraction == 0.0
        assert config.train.precision == "fp16" and config.optim.schedule_every == "epoch"
        if trial.params["controller"] == "strategy2":
            assert config.controller.max_relax_jump == 1.0 and config.controller.interval == 128

    table = (sweep_dir / TABLE_FILE).read_text()
    assert "4 of 4 trials completed" in table and (sweep_dir / FIGURE_FILE).stat().st_size > 10_000
    assert "## held-out protocol" not in table
    paper_section = table.split("## paper protocol")[1]
    dense_row = next(line for line in paper_section.splitlines() if line.startswith("| dense |"))
    values = [best_on_test(sweep_dir / TRIALS_DIR / t.trial_id / "metrics.jsonl", "1.00") for t in trials
              if t.params["controller"] == "dense"]
    low, high = scipy_stats.t.interval(0.95, 1, loc=sum(values) / 2, scale=scipy_stats.sem(values))
    expected = f"{sum(values) / 2:.4f} [{max(low, 0):.4f}, {min(high, 1):.4f}] (n=2)"
    assert dense_row.startswith(f"| dense | 0.8690 | {expected} |"), (dense_row, expected)

    # Welch against dense, Holm over the rule's 1 arm x 2 keep ratios: the corrected p is never below the raw one.
    pairs = [tuple(map(float, m)) for m in re.findall(r"p ([0-9.e-]+), Holm ([0-9.e-]+)", paper_section)]
    assert len(pairs) == 2 and all(holm >= p for p, holm in pairs)
    assert "| Strategy 2 | 0.8802 |" in paper_section and "Strategy 1" not in table

    # Written after every trial: with only some trials done, the table says so and counts what it has.
    partial = paper_table([t for t in trials if t.params["run.seed"] == 3407], read_sweep_file(str(sweep_dir))["space"])
    assert "2 of 4 trials completed" in partial and "partial results" in partial and "(n=1)" in partial
