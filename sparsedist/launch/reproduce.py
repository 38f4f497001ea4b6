"""`sparsedist reproduce`: the paper's table, with confidence intervals instead of single runs.

A Tune sweep (`launch.tune.run_sweep`, so it resumes like any sweep) of the three paper presets as they
are -- dense, Strategy 1, Strategy 2 -- times N seeds, under each selection rule: `paper` (every
training image, best-on-test, as the paper's numbers were obtained) and `heldout` (selection on a
validation split, the honest counterpart). `paper_table.md` and `paper_table.png` in the sweep
directory give, per arm and rule, the mean and 95% interval of the selected checkpoint's test accuracy
at every keep ratio of the grid beside the paper's single-run numbers, with Welch's test against dense
Holm-corrected over the arms and keep ratios of a rule. They are rewritten as each trial completes, so
they show partial results while the others train; `sparsedist report <sweep_dir>` rewrites them too.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from sparsedist import storage
from sparsedist.config import ConfigError, apply_overrides, load_source
from sparsedist.data import DataUnavailableError
from sparsedist.launch.cluster import ClusterError
from sparsedist.launch.tune import SweepError, SweepSpec, run_sweep
from sparsedist.report.reproduction import ARMS, PAPER_SEED, SELECTION_PATH, SELECTIONS, write_paper_table

METRIC = "eval/test/accuracy/keep_1.00"  # reported under both rules (FIFO runs every trial to the end)


def reproduce_spec(seeds: int = 3, selections: tuple[str, ...] = SELECTIONS, overrides: list[str] = (),
                   use_gpu: bool = False, arms: tuple[str, ...] = tuple(ARMS)) -> SweepSpec:
    """The sweep: the paper-dense base (plus --set), the arms' controller sections from their presets."""
    problems = [("--seeds", "must be >= 1", seeds)] if seeds < 1 else []
    problems += [("--arms", f"unknown arm; arms: {', '.join(ARMS)}", arm) for arm in arms if arm not in ARMS]
    if "dense" not in arms:
        problems.append(("--arms", "the table compares every arm with dense: include it", ",".join(arms)))
    if problems:
        raise ConfigError(problems)
    base = apply_overrides(load_source(ARMS["dense"]), [*overrides, *(["scaling.use_gpu=true"] if use_gpu else [])])
    space = {
        "controller": {"grid": {arm: {"preset": preset} for arm, preset in ARMS.items() if arm in arms}},
        SELECTION_PATH: {"grid": list(selections)},
        "run.seed": {"grid": [PAPER_SEED + index for index in range(seeds)]},
    }
    return SweepSpec(base=base, space=space, metric=METRIC, mode="max", scheduler="fifo")


# ------------------------------------------------------------------------------------ command
def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds per arm and rule, from {PAPER_SEED} (default 3)")
    parser.add_argument("--selection", choices=(*SELECTIONS, "both"), default="both",
                        help="paper (best-on-test, as published), heldout (validation split) or both (default)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to run, dense included (default: all, {','.join(ARMS)})")
    parser.add_argument("--gpu", action="store_true", help="one GPU per trial (scaling.use_gpu)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every arm (not its controller section), e.g. train.epochs=100")
    parser.add_argument("--sweep-dir", default=os.path.join("sweeps", "reproduce"),
                        help="sweep directory: a path, or a URI on a cluster (default ./sweeps/reproduce)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted reproduction")


def reproduce_from_args(args: argparse.Namespace) -> int:
    selections = SELECTIONS if args.selection == "both" else (args.selection,)
    try:
        spec = reproduce_spec(args.seeds, selections, args.set, use_gpu=args.gpu, arms=tuple(args.arms.split(",")))
        sweep_dir = storage.absolute(args.sweep_dir)
        # The directory as given: run_sweep refuses a relative one on a cluster.
        run_sweep(spec, args.sweep_dir, max_concurrent=args.max_concurrent, resume=args.resume,
                  on_trial_complete=partial(write_paper_table, sweep_dir))
        table, figure = write_paper_table(sweep_dir)
    except ConfigError as error:
        print(error.format(), file=sys.stderr)
        return 2
    except (SweepError, ClusterError, DataUnavailableError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"table:  {table}\nfigure: {figure}\nreport: sparsedist report {sweep_dir}")
    return 0
