"""`make demo`: a short Strategy 2 run through Ray Train with two CPU workers, on real data when it is on
this machine (Fashion-MNIST, e.g. from the Debian package dataset-fashion-mnist), else on the synthetic
set; prints the per-regime accuracy table and the TensorBoard command."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from sparsedist.config import Config, apply_overrides, load_config, validate
from sparsedist.data import DataUnavailableError, prepare
from sparsedist.launch.train import launch_and_report, run_training

PRESET = "demo"


def demo_config(overrides: Sequence[str] = ()) -> tuple[Config, str]:
    """The demo preset on Fashion-MNIST if a copy is available without downloading, else on the synthetic
    set; also a sentence saying which."""
    cfg = load_config(PRESET, overrides)
    try:
        prepare(cfg.data.model_copy(update={"download": False}))  # offline: only a copy already here
        return cfg, "data: Fashion-MNIST (found on this machine)"
    except DataUnavailableError:
        synthetic = validate(apply_overrides(cfg.to_dict(), {"data.dataset": "synthetic"}))
        return synthetic, ("data: the synthetic set (Fashion-MNIST is not on this machine; install it with "
                           "`sudo apt-get install dataset-fashion-mnist`)")


def run_demo(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the demo (its run directory, runs/demo unless overridden, is replaced each time); returns the summary."""
    cfg, data_note = demo_config(overrides)
    print(f"sparsedist demo. {data_note}\n"
          f"{cfg.controller.warmup_epochs:g} epochs dense, then Strategy 2 (adaptive keep ratio, relax = reset to dense), "
          f"WRN-{cfg.model.depth}-{cfg.model.widen_factor}, "
          f"{cfg.train.epochs} epochs, {cfg.scaling.num_workers} Ray Train workers on CPU\n", flush=True)
    return run_training(cfg, overwrite=True)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the demo preset by dotted path (repeatable)")


def demo_from_args(args: argparse.Namespace) -> int:
    """`sparsedist demo`: run it, print the per-regime table and the TensorBoard command; the exit code."""
    return launch_and_report(lambda: run_demo(args.set))
