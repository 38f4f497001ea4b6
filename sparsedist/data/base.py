"""What the training loop consumes from any data pipeline (FFCV or in-memory tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalized float images NCHW on the device, int64 labels)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per-channel, in pixel units (0..255)
    std: tuple[float, ...]


class PixelNormalization(nn.Module):
    """Raw pixels (uint8 or float, 0..255, N x C x H x W) -> (x - mean) / std per channel, computed as
    (x - mean) * (1 / std) in float32: the one formula the loaders and exported models share, so both
    feed the network bitwise-identical inputs. The memory format of the input is kept."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) - self.mean) * self.inv_std


class TrainLoader(Protocol):
    """One rank's shard of the training set. `set_epoch(e)` fixes the order (seed + e) before iterating;
    `len()` is the number of batches per epoch, equal on every rank."""

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class Loaders:
    spec: DatasetSpec
    train: TrainLoader
    val: Iterable[Batch] | None  # this rank's share; every example exactly once across ranks
    test: Iterable[Batch]
    calibration: Iterable[Batch]  # a few fixed training batches (network-scope threshold calibration)
