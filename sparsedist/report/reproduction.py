"""The paper's table from a `sparsedist reproduce` sweep: paper_table.md and paper_table.png.

Per arm (dense, Strategy 1, Strategy 2) and selection rule, the mean and 95% interval across seeds of the
selected checkpoint's test accuracy at every keep ratio of the grid, beside the paper's single-run
numbers, with Welch's test against dense Holm-corrected over the non-dense arms and keep ratios of a rule.
"""

from __future__ import annotations

import os

from sparsedist import storage
from sparsedist.report.runs import selected_test
from sparsedist.report.stats import ACCURACY_BOUNDS, group_stats, holm, welch_t_test
from sparsedist.report.sweep import Group, Trial, group_trials, read_sweep_file, read_trials, regime_keys

ARMS = {"dense": "paper-dense", "strategy1": "paper-s1", "strategy2": "paper-s2"}  # label -> preset
ARM_NAMES = {"dense": "dense", "strategy1": "Strategy 1", "strategy2": "Strategy 2"}
# The paper's single runs: dense test accuracy, best over 500 epochs on the test set.
PAPER_RESULTS = {"dense": 0.869, "strategy1": 0.8797, "strategy2": 0.8802}
SELECTIONS = ("paper", "heldout")
RULE_TITLES = {"paper": "paper protocol: all 50,000 images, best-on-test epoch",
               "heldout": "held-out protocol: 10% validation split, best-on-validation epoch"}
PAPER_SEED = 3407  # the released script's; further seeds count up from it
TABLE_FILE = "paper_table.md"
FIGURE_FILE = "paper_table.png"
SELECTION_PATH = "eval.selection"


def is_reproduction(sweep: dict) -> bool:
    """Whether a sweep.yaml is a `reproduce` sweep."""
    space = sweep.get("space") or {}
    arms = set((space.get("controller") or {}).get("grid", {}))
    return SELECTION_PATH in space and "dense" in arms and arms <= set(ARMS)


def _values(group: Group, key: str) -> list[float]:
    return [selected_test(t.run)[key] for t in group.completed if key in selected_test(t.run)]


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    stats = group_stats(values, bounds=ACCURACY_BOUNDS)
    interval = f" [{stats.ci_low:.4f}, {stats.ci_high:.4f}]" if stats.n >= 2 else ""
    return f"{stats.mean:.4f}{interval} (n={stats.n})"


def _p(value: float) -> str:
    return "–" if value != value else f"{value:.3g}"


def _rule_groups(trials: list[Trial]) -> dict[str, dict[str, Group]]:
    """selection rule -> arm -> its group of seeds."""
    rules: dict[str, dict[str, Group]] = {}
    for group in group_trials(trials):
        rules.setdefault(group.params[SELECTION_PATH], {})[group.params["controller"]] = group
    return {rule: rules[rule] for rule in SELECTIONS if rule in rules}


def paper_table(trials: list[Trial], space: dict) -> str:
    """The markdown of paper_table.md for the trials of a reproduce sweep over `space` (its sweep.yaml's)."""
    keys = regime_keys(trials)
    rules = _rule_groups(trials)
    completed = sum(t.status == "completed" for t in trials)
    seeds = len(space["run.seed"]["grid"])
    expected = seeds * len(space["controller"]["grid"]) * len(space[SELECTION_PATH]["grid"])
    lines = [
        "# The paper's table, reproduced", "",
        f"{completed} of {expected} trials completed ({seeds} seeds per arm and rule, from {PAPER_SEED}); "
        "statistics use completed trials only" + (" — partial results, trials still to finish." if completed < expected else "."),
        "", "Each cell: mean test accuracy of the selected checkpoint across seeds, [Student-t 95% interval], (n). "
        "p: two-sided Welch's t-test against dense under the same rule; Holm: that p corrected over the "
        "non-dense arms × keep ratios of the rule. The paper's numbers are single runs (seed 3407), dense "
        "accuracy (ρ = 1), best epoch on the test set over 500 epochs: comparable with the paper protocol's row only.",
    ]
    for rule, arms in rules.items():
        family = [(arm, key) for arm in ARMS if arm in arms and arm != "dense" and "dense" in arms for key in keys]
        p_values = [welch_t_test(_values(arms[arm], key), _values(arms["dense"], key)).p_value for arm, key in family]
        tests = dict(zip(family, zip(p_values, holm(p_values))))
        lines += ["", f"## {RULE_TITLES[rule]} (`eval.selection: {rule}`)", "",
                  "| arm | paper (ρ = 1) | " + " | ".join(f"ρ = {key}" for key in keys) + " |",
                  "|---|---:|" + "---|" * len(keys)]
        for arm in (a for a in ARMS if a in arms):
            cells = []
            for key in keys:
                cell = _cell(_values(arms[arm], key))
                if (arm, key) in tests:
                    p, corrected = tests[(arm, key)]
                    cell += f"; p {_p(p)}, Holm {_p(corrected)}"
                cells.append(cell)
            lines.append(f"| {ARM_NAMES[arm]} | {PAPER_RESULTS[arm]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_paper_table(sweep_dir: str, trials: list[Trial] | None = None, out_dir: str | None = None) -> list[str]:
    """paper_table.md and paper_table.png of a reproduce sweep (a path or a URI), in the sweep directory or in
    `out_dir`; returns their locations."""
    from sparsedist.report.figures import Series, plot_reproduction

    sweep = read_sweep_file(sweep_dir)
    trials = read_trials(sweep_dir) if trials is None else trials
    local = out_dir or storage.working_dir(sweep_dir, "sweeps")
    with open(os.path.join(local, TABLE_FILE), "w", encoding="utf-8") as handle:
        handle.write(paper_table(trials, sweep["space"]))
    panels = {RULE_TITLES[rule]: [Series(ARM_NAMES[arm], [t.run for t in group.completed]) for arm, group in arms.items()]
              for rule, arms in _rule_groups(trials).items()}
    plot_reproduction(panels, {ARM_NAMES[arm]: accuracy for arm, accuracy in PAPER_RESULTS.items()},
                      os.path.join(local, FIGURE_FILE))
    if out_dir is not None:
        return [os.path.join(out_dir, name) for name in (TABLE_FILE, FIGURE_FILE)]
    if storage.is_uri(sweep_dir):
        for name in (TABLE_FILE, FIGURE_FILE):
            storage.upload(os.path.join(local, name), storage.join(sweep_dir, name))
    return [storage.join(sweep_dir, name) for name in (TABLE_FILE, FIGURE_FILE)]
