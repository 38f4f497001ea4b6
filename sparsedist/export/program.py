"""`model.pt2`: one torch.export program for every regime, with rho a tensor input.

A Python float rho would be burned into the graph as a constant, so the program takes
`(images, keep_ratio)` with keep_ratio a 0-d float64 tensor and the batch size dynamic.
Layer scope selects with `top_k_per_sample_traced` (no shape depends on rho). Network scope looks
tau up in the table of trained regimes (plus rho = 1 -> tau = 0), taking the nearest trained rho:
a graph cannot refuse an untrained rho, so callers should pass trained ones (config.json lists them).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedist.data.base import PixelNormalization
from sparsedist.export.load import SparseModel, build_network
from sparsedist.sparsity.layer import top_k_per_sample_traced


class TracedSelection:
    """What every site of the program applies; `forward` of the program sets rho or tau for the call."""

    def __init__(self, scope: str):
        self.scope = scope
        self.keep_ratio: torch.Tensor | None = None
        self.threshold: torch.Tensor | None = None

    def new_site(self, name: str) -> nn.Module:
        return TracedSite(self)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.scope == "layer":
            return top_k_per_sample_traced(x, self.keep_ratio)
        # Keeps x >= tau, as the eager zero_below does (tau 0 keeps every ReLU output).
        return torch.where(x >= self.threshold.to(x.dtype), x, 0.0)


class TracedSite(nn.Module):
    def __init__(self, selection: TracedSelection):
        super().__init__()
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.selection.apply(x)


class ProgramModel(nn.Module):
    """forward(images, keep_ratio) with the weights and regimes of a loaded `SparseModel`."""

    def __init__(self, model: SparseModel):
        super().__init__()
        config = model.config
        self.selection = TracedSelection(model.scope)
        self.normalize = PixelNormalization(config["input"]["mean"], config["input"]["std"])
        self.network = build_network(config, self.selection.new_site)
        self.network.load_state_dict(model.network.state_dict())
        table = {1.0: 0.0, **model.thresholds}
        self.register_buffer("regime_keep_ratios", torch.tensor(list(table), dtype=torch.float64))
        self.register_buffer("regime_thresholds", torch.tensor(list(table.values()), dtype=torch.float32))

    def forward(self, images: torch.Tensor, keep_ratio: torch.Tensor) -> torch.Tensor:
        self.selection.keep_ratio = keep_ratio
        nearest = (self.regime_keep_ratios - keep_ratio.to(torch.float64)).abs().argmin()
        self.selection.threshold = self.regime_thresholds[nearest]
        return self.network(self.normalize(images))


def export_program(model: SparseModel, path: str) -> None:
    """Write the torch.export program of `model` (float32 pixel images, any batch size) to `path`."""
    program = ProgramModel(model).eval()
    config = model.config["input"]
    size = config["image_size"]
    example = (torch.zeros(2, config["channels"], size, size), torch.tensor(1.0, dtype=torch.float64))
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        exported = torch.export.export(program, example, dynamic_shapes=({0: batch}, None))
    torch.export.save(exported, path)
