"""`sparsedist.load_model`: an exported model as a plain `nn.Module` taking raw images, at one regime.

Imports torch, safetensors, pydantic and the model code only: never Ray, FFCV or the data pipeline.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from sparsedist.config import ModelConfig
from sparsedist.data.base import PixelNormalization
from sparsedist.export.artifact import WEIGHTS_FILE, ArtifactError, check_keep_ratio, read_config
from sparsedist.models import build_model
from sparsedist.models.wrn import SiteFactory
from sparsedist.sparsity import ActivationSparsity


def build_network(config: dict[str, Any], make_site: SiteFactory) -> nn.Module:
    """The exported architecture (config.json's `model` section) with `make_site` at every sparsity site."""
    try:
        model_cfg = ModelConfig.model_validate(config["model"])
    except (KeyError, ValidationError) as error:
        raise ArtifactError("model", f"not a valid model section: {error}") from None
    return build_model(model_cfg, config["input"]["channels"], config["num_classes"], make_site)


def load_weights(network: nn.Module, path: str) -> None:
    """Load model.safetensors into `network`, refusing tensors that do not match the architecture."""
    try:
        weights = load_file(path)
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(WEIGHTS_FILE, f"cannot read {path}: {error}") from None
    expected = network.state_dict()
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [f"{name} has shape {tuple(weights[name].shape)}, the architecture needs {tuple(tensor.shape)}"
                 for name, tensor in expected.items() if name in weights and weights[name].shape != tensor.shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(WEIGHTS_FILE, f"does not match the architecture in config.json: {shown}")
    network.load_state_dict(weights)


class SparseModel(nn.Module):
    """An exported network with its input normalization, run at one keep-ratio regime.

    `forward(images)` takes raw images (uint8 or float pixel values 0..255, N x C x H x W).
    Layer scope runs at any rho in (0, 1]. Network scope runs at the stored tau of a trained regime
    (rho = 1 is always dense); another rho needs calibration images to find its tau.
    """

    def __init__(self, config: dict[str, Any], network: nn.Module, sparsity: ActivationSparsity):
        super().__init__()
        self.config = config
        self.normalize = PixelNormalization(config["input"]["mean"], config["input"]["std"])
        self.network = network
        self.sparsity = sparsity
        sparsity.collecting = False
        self.thresholds = {regime["keep_ratio"]: regime["threshold"] for regime in config["regimes"]}

    @property
    def scope(self) -> str:
        return self.sparsity.scope

    @property
    def keep_ratio(self) -> float:
        return self.sparsity.keep_ratio

    @property
    def trained_keep_ratios(self) -> list[float]:
        return sorted(self.thresholds, reverse=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(images))

    @torch.no_grad()
    def set_keep_ratio(self, keep_ratio: float, calibration: torch.Tensor | Iterable[torch.Tensor] | None = None) -> None:
        """Switch regimes. Network scope: the stored tau of a trained rho, or one calibrated on `calibration`
        (raw image batches, e.g. a few hundred training images) for any other rho."""
        keep_ratio = check_keep_ratio(keep_ratio)
        if self.scope == "layer" or keep_ratio == 1.0:
            self.sparsity.set_regime(keep_ratio, 0.0 if self.scope == "network" else None)
            return
        trained = next((ratio for ratio in self.thresholds if math.isclose(ratio, keep_ratio, rel_tol=1e-9)), None)
        if trained is not None:
            self.sparsity.set_regime(keep_ratio, self.thresholds[trained])
            return
        if calibration is None:
            raise ArtifactError("keep_ratio", f"{keep_ratio} is not a trained regime of this network-scope model "
                                              f"(trained: {', '.join(map(str, self.trained_keep_ratios))}); pass "
                                              "calibration images to calibrate its threshold")
        self.sparsity.set_regime(keep_ratio, self._calibrate(keep_ratio, calibration))

    def _calibrate(self, keep_ratio: float, calibration: torch.Tensor | Iterable[torch.Tensor]) -> float:
        batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)

        def run_forward() -> None:
            for images in batches:
                self(images)

        settings = self.config["sparsity"]
        result = self.sparsity.calibrate(run_forward, keep_ratio, tolerance=settings["calibration_tolerance"],
                                         max_iters=settings["calibration_max_iters"])
        self.thresholds[keep_ratio] = result.threshold
        return result.threshold


def load_model(directory: str | os.PathLike, keep_ratio: float = 1.0, device: str | torch.device = "cpu",
               calibration: torch.Tensor | Iterable[torch.Tensor] | None = None) -> SparseModel:
    """An exported model (a `sparsedist export` directory), in eval mode on `device`, at `keep_ratio`."""
    directory = os.fspath(directory)
    config = read_config(directory)
    try:
        sparsity = ActivationSparsity(config["sparsity"]["scope"])
    except (KeyError, ValueError) as error:
        raise ArtifactError("sparsity.scope", str(error)) from None
    network = build_network(config, sparsity.new_site)
    load_weights(network, os.path.join(directory, WEIGHTS_FILE))
    model = SparseModel(config, network, sparsity).to(device).eval()
    model.set_keep_ratio(keep_ratio, calibration)
    return model
