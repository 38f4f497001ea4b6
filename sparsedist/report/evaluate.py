"""`sparsedist eval`: the per-regime accuracy table of any checkpoint, on its own run's data splits.

The model is rebuilt exactly as the training loop builds it, from the config stored in the checkpoint,
and evaluated with the loop's own `evaluate_regimes` (network scope: tau calibrated per regime on
training batches), on one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sparsedist.config import Config, ConfigError, apply_overrides, regime_key, validate
from sparsedist import storage
from sparsedist.rundir import BEST_DIR
from sparsedist.models import build_model
from sparsedist.sparsity import ActivationSparsity
from sparsedist.train.checkpoint import MARKER_FILE, CheckpointError, latest_checkpoint, load_checkpoint
from sparsedist.train.loop import evaluate_regimes


@dataclass
class CheckpointEvaluation:
    checkpoint: str
    epoch: int  # 0-based epoch the checkpoint was taken after
    config: Config  # the checkpoint's config with the evaluated keep ratios
    accuracy: dict[str, dict[str, float]]  # {"val"|"test": {regime key: accuracy}}
    calibration: dict[str, dict[str, Any]]  # network scope: {regime key: threshold, realized_keep, ...}
    weights: dict[str, torch.Tensor]  # the evaluated network's state dict (export writes it as is)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "scope": self.config.sparsity.scope,
                "accuracy": self.accuracy, "calibration": self.calibration}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or for a run directory its best/ checkpoint, else its newest one.
    One in object storage is copied to this machine first: that checkpoint alone."""
    path = storage.absolute(path)
    storage.check_readable(path)
    if storage.is_file(storage.join(path, MARKER_FILE)):
        chosen = path
    elif storage.is_file(storage.join(path, BEST_DIR, MARKER_FILE)):
        chosen = storage.join(path, BEST_DIR)
    else:
        chosen = latest_checkpoint(path)
    if chosen is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory holding one")
    if not storage.is_uri(chosen):
        return chosen
    local = os.path.join(tempfile.mkdtemp(prefix="sparsedist-read-"), storage.parent_and_name(chosen)[1])
    storage.download(chosen, local)
    return local


def evaluate_checkpoint(path: str, *, device: torch.device, keep_ratios: Sequence[float] | None = None,
                        overrides: Sequence[str] = ()) -> CheckpointEvaluation:
    """Per-regime validation and test accuracy of a checkpoint (or a run directory's best checkpoint).

    `keep_ratios` replaces the run's eval grid; `overrides` (dotted key=value) adjust the stored config,
    e.g. data.root when the data lives elsewhere than where the run trained.
    """
    from sparsedist.data import build_loaders  # FFCV: imported only when evaluating

    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint, map_location=device)
    data = apply_overrides(Config.model_validate_json(state["config"]).to_dict(), list(overrides))
    if keep_ratios is not None:
        # The selection ratio must be on the grid; it selects nothing here.
        data = apply_overrides(data, {"eval.keep_ratios": list(keep_ratios), "eval.select_keep_ratio": keep_ratios[0]})
    cfg = validate(data)

    loaders = build_loaders(cfg, rank=0, world_size=1, device=device, epoch=state["epoch"] + 1)
    sparsity = ActivationSparsity(cfg.sparsity.scope)
    model = build_model(cfg.model, loaders.spec.channels, loaders.spec.num_classes, sparsity.new_site).to(device)
    model.load_state_dict(state["model"])
    sparsity.load_state_dict(state["sparsity"])
    accuracy, calibration = evaluate_regimes(model, sparsity, loaders, cfg, device)
    return CheckpointEvaluation(checkpoint, state["epoch"], cfg, accuracy, calibration, state["model"])


def regime_text(evaluation: CheckpointEvaluation) -> str:
    """The per-regime table as aligned text, one row per keep ratio."""
    splits = list(evaluation.accuracy)
    network = evaluation.config.sparsity.scope == "network"
    header = ["keep", *splits] + (["realized keep", "tau"] if network else [])
    rows = []
    for ratio in evaluation.config.eval.keep_ratios:
        key = regime_key(ratio)
        row = [key, *(f"{evaluation.accuracy[split][key]:.4f}" for split in splits)]
        if network:
            calibrated = evaluation.calibration.get(key)
            row += [f"{calibrated['realized_keep']:.4f}", f"{calibrated['threshold']:.4g}"] if calibrated else ["1.0000", "0"]
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    title = (f"{evaluation.checkpoint} (epoch {evaluation.epoch + 1}, {evaluation.config.sparsity.scope} scope, "
             f"{evaluation.config.data.dataset})")
    return "\n".join([title, *lines])


def keep_ratio_list(text: str) -> list[float]:
    """--keep-ratios: comma-separated keep ratios, e.g. 1,0.5,0.2."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,0.5,0.2; got {text!r}") from None


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """--keep-ratios, --set and --device: how a command evaluates a checkpoint (eval, export)."""
    parser.add_argument("--keep-ratios", type=keep_ratio_list, default=None, metavar="R1,R2,...",
                        help="keep ratios to evaluate (default: the run's eval.keep_ratios)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the checkpoint's config, e.g. data.root=/data (repeatable)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def device_from_args(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    """What `eval` and `export` read: the same forms for both (`resolve_checkpoint`)."""
    parser.add_argument("source", metavar="SOURCE", help="a checkpoint directory, or a run directory (its best/, else "
                        "its newest checkpoint); a path or a storage URI (s3://..., gs://...)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sparsedist eval` flags."""
    add_source_argument(parser)
    parser.add_argument("--json", metavar="OUT", help="also write the accuracies as JSON")
    add_evaluation_options(parser)


def eval_from_args(args: argparse.Namespace) -> int:
    from sparsedist.data import DataUnavailableError

    device = device_from_args(args)
    try:
        evaluation = evaluate_checkpoint(args.source, device=device, keep_ratios=args.keep_ratios, overrides=args.set)
    except ConfigError as error:
        print(error.format(), file=sys.stderr)
        return 2
    except (CheckpointError, DataUnavailableError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(regime_text(evaluation))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(evaluation.to_dict(), handle, indent=2)
    return 0
