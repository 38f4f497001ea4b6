"""`sparsedist export`: a checkpoint (or a run directory's best one) -> a self-contained model directory.

The per-regime accuracies and network-scope thresholds come from `evaluate_checkpoint`, the same
evaluation as `sparsedist eval`. Everything is written into a hidden sibling directory that is
renamed into place at the end, so a failed export (missing or damaged checkpoint, missing data)
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from sparsedist.atomic import replace_directory, staging_sibling
from sparsedist.config import ConfigError, regime_key
from sparsedist.data.registry import get_spec
from sparsedist.export.artifact import (CARD_FILE, CONFIG_FILE, FORMAT_VERSION, PROGRAM_FILE, WEIGHTS_FILE,
                                        ArtifactError, check_keep_ratio)
from sparsedist.provenance import package_version, source_commit
from sparsedist.storage import StorageError
from sparsedist.report.evaluate import (CheckpointEvaluation, add_evaluation_options, add_source_argument, device_from_args,
                                        evaluate_checkpoint)
from sparsedist.train.checkpoint import CheckpointError

CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}


class ExportError(Exception):
    """The export cannot be written (e.g. the output directory exists)."""


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{package: package_version(package) for package in ("sparsedist", "safetensors")}}


def regimes(evaluation: CheckpointEvaluation) -> list[dict[str, Any]]:
    """Per trained keep ratio: accuracy per split, and the tau it runs with and its realized keep ratio."""
    rows = []
    for keep_ratio in evaluation.config.eval.keep_ratios:
        key = regime_key(keep_ratio)
        calibrated = evaluation.calibration.get(key)
        rows.append({
            "keep_ratio": keep_ratio,
            "accuracy": {split: accuracies[key] for split, accuracies in evaluation.accuracy.items()},
            # Layer scope and rho = 1 run without a threshold; realized keep is measured only by calibration.
            "threshold": calibrated["threshold"] if calibrated else 0.0,
            "realized_keep": calibrated["realized_keep"] if calibrated else None,
        })
    return rows


def artifact_config(evaluation: CheckpointEvaluation, with_program: bool) -> dict[str, Any]:
    cfg = evaluation.config
    spec = get_spec(cfg.data)
    return {
        "format_version": FORMAT_VERSION,
        "architecture": cfg.model.arch,
        "model": cfg.model.model_dump(mode="json"),
        "input": {"channels": spec.channels, "image_size": spec.image_size, "layout": "NCHW",
                  "pixel_range": [0, 255], "mean": list(spec.mean), "std": list(spec.std),
                  "normalization": "(pixels - mean) / std, per channel, pixels in 0..255 (uint8 or float)"},
        "num_classes": spec.num_classes,
        "class_names": CLASS_NAMES.get(cfg.data.dataset),
        "sparsity": {"scope": cfg.sparsity.scope, "calibration_tolerance": cfg.sparsity.calibration_tolerance,
                     "calibration_max_iters": cfg.sparsity.calibration_max_iters},
        "regimes": regimes(evaluation),
        "files": {"weights": WEIGHTS_FILE, "program": PROGRAM_FILE if with_program else None},
        "provenance": {"checkpoint": evaluation.checkpoint, "epoch": evaluation.epoch, "dataset": cfg.data.dataset,
                       "config": cfg.to_dict(), "code": source_commit(), "versions": versions()},
    }


def regime_table(config: dict[str, Any]) -> str:
    """The per-regime markdown table of an export's config."""
    network = config["sparsity"]["scope"] == "network"
    splits = list(config["regimes"][0]["accuracy"])
    header = ["keep ratio ρ", *(f"{split} accuracy" for split in splits)] + (["τ", "realized keep"] if network else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for regime in config["regimes"]:
        cells = [f"{regime['keep_ratio']:g}", *(f"{regime['accuracy'][split]:.4f}" for split in splits)]
        if network:
            realized = regime["realized_keep"]
            cells += [f"{regime['threshold']:.4g}", "1 (dense)" if realized is None else f"{realized:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(config: dict[str, Any]) -> str:
    network = config["sparsity"]["scope"] == "network"
    model, provenance, size = config["model"], config["provenance"], config["input"]["image_size"]
    trained = ", ".join(f"{regime['keep_ratio']:g}" for regime in config["regimes"])
    program = ("\n`model.pt2` serves every regime with ρ as a tensor input (float32 pixels, any batch size):\n\n"
               "```python\nprogram = torch.export.load(\"model.pt2\").module()\n"
               "logits = program(images.float(), torch.tensor(0.1, dtype=torch.float64))\n```\n"
               + ("Network scope: the program uses the τ of the nearest trained ρ.\n" if network else "")
               if config["files"]["program"] else "")
    return f"""# WRN-{model['depth']}-{model['widen_factor']}, {config['sparsity']['scope']}-scope activation sparsity ({provenance['dataset']})

One network trained across activation keep ratios ρ (top-k sparsity after every hidden ReLU) with
[sparsedist](https://arxiv.org/abs/2603.03131). Input: {config['input']['channels']}×{size}×{size} images,
pixel values 0..255 (uint8 or float, N×C×H×W); normalization is inside the model.

## Accuracy per regime

Checkpoint `{provenance['checkpoint']}` (epoch {provenance['epoch'] + 1}); validation is held out of the training set.

{regime_table(config)}

## Load

```python
import sparsedist
model = sparsedist.load_model("path/to/this/directory", keep_ratio=0.1, device="cpu")
logits = model(images)          # images: uint8 or float, N×C×H×W, 0..255
model.set_keep_ratio(0.05)      # switch regimes
```

{"Network scope: `set_keep_ratio` uses the stored τ of a trained ρ (" + trained + "); any other ρ needs "
 "calibration images: `model.set_keep_ratio(0.15, calibration=train_images)`." if network else
 "Layer scope: any ρ in (0, 1] runs; the trained regimes are " + trained + "."}
{program}
Loading needs torch, safetensors, pydantic and sparsedist; not Ray or FFCV. `config.json` holds the
architecture, input spec, per-regime figures and the run's full config.
"""


def export_checkpoint(source: str, out: str, *, device: torch.device, keep_ratios: Sequence[float] | None = None,
                      program: bool = False, overwrite: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Export `source` (a checkpoint or run directory) to the directory `out`; returns the written config."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    for keep_ratio in keep_ratios or ():
        check_keep_ratio(keep_ratio)
    evaluation = evaluate_checkpoint(source, device=device, keep_ratios=keep_ratios, overrides=overrides)
    config = artifact_config(evaluation, with_program=program)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = staging_sibling(out)
    try:
        save_file({name: tensor.cpu().contiguous() for name, tensor in evaluation.weights.items()},
                  os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        if program:
            from sparsedist.export.load import load_model
            from sparsedist.export.program import export_program

            export_program(load_model(staging), os.path.join(staging, PROGRAM_FILE))
        with open(os.path.join(staging, CARD_FILE), "w", encoding="utf-8") as handle:
            handle.write(model_card(config))
        share_like_other_files(staging)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def share_like_other_files(directory: str) -> None:
    """The permissions the umask gives new files: mkdtemp and safetensors create theirs private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    parser.add_argument("--out", required=True, help="directory to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--program", action="store_true", help="also write model.pt2, a torch.export program with rho as input")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_evaluation_options(parser)  # the regimes stored are those evaluated


def export_from_args(args: argparse.Namespace) -> int:
    from sparsedist.data import DataUnavailableError

    try:
        config = export_checkpoint(args.source, args.out, device=device_from_args(args), keep_ratios=args.keep_ratios,
                                   program=args.program, overwrite=args.overwrite, overrides=args.set)
    except ConfigError as error:
        print(error.format(), file=sys.stderr)
        return 2
    except (ExportError, ArtifactError, CheckpointError, DataUnavailableError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {config['provenance']['checkpoint']} to {os.path.abspath(args.out)}")
    print(regime_table(config))
    return 0
