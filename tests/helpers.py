"""Small in-memory problems for loop tests (the FFCV pipeline has its own tests)."""

from __future__ import annotations

import torch

from sparsedist.config import Config, load_config
from sparsedist.data.base import DatasetSpec
from sparsedist.data.memory import tensor_loaders

SPEC = DatasetSpec("tensors", channels=3, image_size=16, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)


def learnable_tensors(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a fixed random pattern; samples are the pattern plus noise (normalized floats)."""
    patterns = torch.randn(SPEC.num_classes, SPEC.channels, SPEC.image_size, SPEC.image_size,
                           generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, SPEC.num_classes, (count,), generator=generator)
    images = patterns[labels] + 1.5 * torch.randn(count, SPEC.channels, SPEC.image_size, SPEC.image_size, generator=generator)
    return images, labels


def tiny_config(*overrides: str) -> Config:
    return load_config("smoke", ["data.loader_workers=1", "train.log_every_steps=1", *overrides])


def loaders_for(cfg: Config, rank: int = 0, world_size: int = 1, train_count: int = 256,
                device: torch.device = torch.device("cpu")):
    return tensor_loaders(
        SPEC, learnable_tensors(train_count, seed=1), learnable_tensors(64, seed=3),
        val=learnable_tensors(64, seed=2) if cfg.data.val_fraction > 0 else None,
        batch_size=cfg.train.batch_size, eval_batch_size=64, rank=rank, world_size=world_size, seed=cfg.run.seed,
        device=device,
        calibration_batches=cfg.sparsity.calibration_batches, max_steps_per_epoch=cfg.train.max_steps_per_epoch,
    )
