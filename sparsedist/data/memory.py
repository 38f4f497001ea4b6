"""In-memory tensor loaders with the same sharding rules as the FFCV pipeline (unit tests, benchmarks).

Each epoch a permutation seeded by seed + epoch is computed identically on every rank; global batches of
`batch_size` are cut from it (the remainder is dropped, as in the paper) and rank r takes the r-th
equal slice of every global batch, so N replicas see exactly what one process sees on the concatenation.
"""

from __future__ import annotations

from typing import Iterator

import torch

from sparsedist.data.base import Batch, DatasetSpec, Loaders


class TensorTrainLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, rank: int, world_size: int,
                 seed: int, device: torch.device, max_steps: int | None = None):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by world size {world_size}")
        # On the device once: batches are then cut there, with no per-step copy that waits for the host.
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.steps = len(images) // batch_size if max_steps is None else min(max_steps, len(images) // batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.to(self.device)
        local = self.batch_size // self.world_size
        for step in range(self.steps):
            start = step * self.batch_size + self.rank * local
            index = order[start:start + local]
            yield self.images[index], self.labels[index]


def tensor_eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, rank: int, world_size: int,
                        device: torch.device) -> list[Batch]:
    """This rank's share (indices r, r+W, ...): every example exactly once across ranks."""
    index = torch.arange(rank, len(images), world_size)
    return [(images[chunk].to(device), labels[chunk].to(device)) for chunk in index.split(batch_size)]


def tensor_loaders(spec: DatasetSpec, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   val: tuple[torch.Tensor, torch.Tensor] | None = None, *, batch_size: int, eval_batch_size: int = 256,
                   rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device = torch.device("cpu"),
                   calibration_batches: int = 2, max_steps_per_epoch: int | None = None) -> Loaders:
    """Loaders over already-normalized float tensors (N, C, H, W) and int64 labels."""
    local = batch_size // world_size
    # The first global batches of the unshuffled training set, this rank's slice of each.
    slices = [slice((i * world_size + rank) * local, (i * world_size + rank + 1) * local) for i in range(calibration_batches)]
    calibration = [(train[0][s].to(device), train[1][s].to(device)) for s in slices]
    return Loaders(
        spec=spec,
        train=TensorTrainLoader(*train, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                                max_steps=max_steps_per_epoch),
        val=None if val is None else tensor_eval_batches(*val, eval_batch_size, rank=rank, world_size=world_size, device=device),
        test=tensor_eval_batches(*test, eval_batch_size, rank=rank, world_size=world_size, device=device),
        calibration=calibration,
    )
