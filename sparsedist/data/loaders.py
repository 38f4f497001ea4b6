"""FFCV loaders for one training worker: its training shard, its share of val/test, calibration batches.

Training sharding. The training loader uses FFCV's own distributed order (`distributed=True`,
RANDOM): every rank draws the same permutation seeded by run.seed + epoch and takes every
world_size-th element, like torch's DistributedSampler. That sampler pads the permutation with
duplicates when the training split is not a multiple of world_size, so the loader is given the
first N - N % world_size examples only (at most world_size - 1 examples never used) and no
example is ever doubled. Each rank then has the same number of examples and, with drop_last, the
same number of full batches; the N' mod global-batch examples at the tail of each epoch's
permutation are skipped for that epoch only (a different few every epoch), exactly like
single-process drop_last training.

Evaluation (val/test) splits the examples into world_size contiguous parts (sizes differ by at
most one), sequential, keeping the last partial batch: every example is evaluated exactly once
across ranks and the ranks' batch counts may differ by one, so reduce sums, not per-batch values.

FFCV yields reused buffers; every batch handed out is a fresh tensor (float images, copied labels).
"""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path
from typing import Callable, Iterator

import numba
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsedist.data._ffcv import (
    IntDecoder, Loader, NDArrayDecoder, OrderOption, Squeeze, ToDevice, ToTensor, ToTorchImage, keeping_torch_threads,
)
from sparsedist.data.base import Batch, DatasetSpec, Loaders, PixelNormalization
from sparsedist.data.preparation import prepare
from sparsedist.data.registry import get_spec

CROP_PADDING = 4  # pixels of zero padding (the dataset mean after normalization) before the random crop


def build_loaders(cfg, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"), epoch: int = 0, log: Callable[[str], None] = print) -> Loaders:
    """All loaders of one worker (`cfg` is a `sparsedist.config.Config`); prepares the data files if needed.

    With world_size > 1 the default process group must exist (FFCV's distributed order reads it).
    `epoch` is the epoch the training loader starts at (resume); `set_epoch` changes it later.
    """
    _check_process_group(rank, world_size)
    spec = get_spec(cfg.data)
    paths = prepare(cfg.data, log)
    threads = _loader_threads(cfg.data.loader_workers, log)
    finish = BatchFinisher(spec, device)
    global_batch = cfg.train.batch_size
    batch = global_batch // world_size
    train_count = paths.counts["train"]
    # Drop the remainder that FFCV's distributed sampler would pad with duplicates (see module docstring).
    train_indices = np.arange(train_count - train_count % world_size)
    if len(train_indices) < global_batch:
        raise ValueError(f"the training split has {train_count} examples, fewer than one global batch ({global_batch})")

    def loader(path: Path, batch_size: int, indices: np.ndarray, **kwargs) -> Loader:
        return _ffcv_loader(path, batch_size, indices, threads, device, **kwargs)

    train = FFCVBatches(
        loader(paths.train, batch, train_indices, order=OrderOption.RANDOM, distributed=world_size > 1, seed=cfg.run.seed, drop_last=True),
        finish,
        max_batches=cfg.train.max_steps_per_epoch,
        epoch=epoch,
        augment=RandomCropFlip(cfg.run.seed, rank) if cfg.data.augment else None,
    )
    # A fixed seeded subset of the training split, the same on every call: rank r takes every world_size-th example.
    calibration_count = min(cfg.sparsity.calibration_batches, train_count // global_batch)
    calibration_indices = np.random.default_rng(cfg.run.seed).permutation(train_count)[: calibration_count * global_batch]
    calibration = FFCVBatches(loader(paths.train, batch, calibration_indices[rank::world_size], drop_last=True), finish)

    def evaluation(path: Path | None, split: str) -> FFCVBatches | None:
        if path is None:
            return None
        share = np.array_split(np.arange(paths.counts[split]), world_size)[rank]
        return FFCVBatches(loader(path, cfg.eval.batch_size, share, drop_last=False), finish)

    return Loaders(spec=spec, train=train, val=evaluation(paths.val, "val"), test=evaluation(paths.test, "test"), calibration=calibration)


class FFCVBatches:
    """An FFCV loader yielding finished batches; implements the TrainLoader protocol of `base.py`.

    `set_epoch(e)` fixes the next iteration's epoch (FFCV seeds RANDOM order with seed + epoch);
    without it each iteration advances the epoch by one. `max_batches` caps an epoch. An epoch
    ended early (the cap, or a consumer that stops) is closed and its FFCV thread joined, so no
    loader thread outlives its epoch; FFCV's thread notices within its 0.5 s queue time-out.
    """

    def __init__(self, loader: Loader, finish: BatchFinisher, max_batches: int | None = None, epoch: int = 0, augment: RandomCropFlip | None = None):
        self._loader = loader
        self._finish = finish
        self._batches = len(loader) if max_batches is None else min(len(loader), max_batches)
        self._augment = augment
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._loader.next_epoch = epoch  # FFCV's epoch counter: the order of a resumed epoch is reproduced
        with keeping_torch_threads():
            ffcv_epoch = iter(self._loader)
        generator = self._augment.generator(epoch) if self._augment else None
        try:
            for _, (images, labels) in zip(range(self._batches), ffcv_epoch):
                images, labels = self._finish(images, labels)
                yield (self._augment(images, generator) if self._augment else images), labels
        finally:
            close_epoch(ffcv_epoch)


def close_epoch(ffcv_epoch) -> None:
    """Stop an FFCV epoch's thread and wait for it. The thread's last act is a blocking put(None) without
    a time-out: when the consumer stopped early with exactly `batches_ahead` batches left, the queue is
    full and that put would wait forever, so the queue is drained until the thread has ended."""
    ffcv_epoch.close()
    while ffcv_epoch.is_alive():
        with contextlib.suppress(queue.Empty):
            while True:
                ffcv_epoch.output_queue.get_nowait()
        ffcv_epoch.join(timeout=0.1)


class BatchFinisher:
    """uint8 N x C x H x W (FFCV's buffer) -> normalized float32 on the device; labels int64, copied.

    CUDA batches are channels_last (FFCV already delivers that layout); CPU batches are contiguous.
    """

    def __init__(self, spec: DatasetSpec, device: torch.device):
        self.normalize = PixelNormalization(spec.mean, spec.std).to(device)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        images = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return self.normalize(images), labels.to(torch.int64, copy=True)


class RandomCropFlip:
    """Random crop after zero padding and random horizontal flip, drawn from a seeded torch generator.

    The generator is seeded by (run seed, epoch, rank), so a resumed epoch repeats its augmentation.
    Draws happen on the CPU and move to the batch's device, so CPU and CUDA runs crop alike.
    """

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def generator(self, epoch: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=generator).to(images.device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        padded = F.pad(images, (CROP_PADDING,) * 4)
        rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, :, None]  # n x H x 1
        cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, :]  # n x 1 x W
        cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
        samples = torch.arange(n, device=images.device)[:, None, None]
        cropped = padded.permute(0, 2, 3, 1)[samples, rows, cols]  # n x H x W x C
        return cropped.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last if images.is_cuda else torch.contiguous_format)


def _ffcv_loader(path: Path, batch_size: int, indices: np.ndarray, threads: int, device: torch.device, order: OrderOption = OrderOption.SEQUENTIAL, **kwargs) -> Loader:
    # decode -> tensor -> N x C x H x W view (channels_last strides) -> device; float and normalize follow in torch.
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    pipelines = {
        "image": [NDArrayDecoder(), ToTensor(), ToTorchImage(channels_last=True), *to_device],
        "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
    }
    with keeping_torch_threads():
        return Loader(str(path), batch_size, num_workers=threads, order=order, indices=indices, pipelines=pipelines, **kwargs)


def _loader_threads(requested: int, log: Callable[[str], None]) -> int:
    # FFCV passes its thread count to numba, which refuses more than NUMBA_NUM_THREADS (the core count by default).
    available = numba.config.NUMBA_NUM_THREADS
    if requested > available:
        log(f"data.loader_workers={requested} exceeds the {available} threads numba allows here; using {available}")
    return min(requested, available)


def _check_process_group(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size and dist.get_rank() == rank):
        raise RuntimeError(f"sharded loaders for rank {rank} of {world_size} need the matching default process group")
