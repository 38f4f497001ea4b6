"""Real checkpoints to export: one epoch of the smoke problem, trained in-process on FFCV synthetic data."""

import os

import torch

from sparsedist.config import load_config
from sparsedist.data import build_loaders
from sparsedist.train.checkpoint import save_checkpoint
from sparsedist.train.loop import train

KEEP_RATIOS = [1.0, 0.5, 0.2, 0.05]


def train_run(root, scope):
    """A run directory whose best/ checkpoint comes from one epoch of the smoke problem."""
    cfg = load_config("smoke", [f"data.root={root}/data", "train.epochs=1", f"sparsity.scope={scope}",
                                f"eval.keep_ratios={KEEP_RATIOS}", "controller.strategy=fixed", "controller.keep_ratio=0.2"])
    run_dir = os.path.join(root, f"run-{scope}")

    def save_best(end):
        save_checkpoint(end.state(), os.path.join(run_dir, "best"))

    train(cfg, build_loaders(cfg, log=lambda line: None), device=torch.device("cpu"), on_epoch_end=save_best)
    return run_dir
