"""What the training loop consumes from any data pipeline (FFCV or in-memory tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalized float images NCHW on the device, int64 labels)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per-channel, in pixel units (0..255)
    std: tuple[float, ...]


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
