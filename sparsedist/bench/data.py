"""Data pipeline throughput: FFCV vs a torchvision DataLoader vs in-memory tensors, and data wait per step.

All three loaders serve the same training split with the same batch size; the FFCV loader and the
DataLoader get the same worker count (FFCV threads vs DataLoader worker processes). Throughput is
images per second through the whole pipeline up to normalized float batches, measured over full
epochs after one warm-up epoch (FFCV compiles its pipeline, DataLoader starts its workers). The
torchvision baseline is the standard recipe: PIL image per sample, ToTensor, Normalize, collate.
The in-memory ceiling is `sparsedist.data.memory`'s loader over already-normalized tensors.

Data wait: real training steps (forward, backward, SGD) of the configured model fed by the FFCV
loader; the fraction of step time spent blocked on the next batch. The same steps fed from memory
give the step time without any loader, so loader threads competing for cores show up as well.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from sparsedist.bench import run_benchmark
from sparsedist.config import Config, apply_overrides, validate
from sparsedist.data import build_loaders, prepare
from sparsedist.data.memory import TensorTrainLoader
from sparsedist.data.preparation import split_train_val
from sparsedist.data.sources import load_source
from sparsedist.models import build_model

TARGETS = {"ffcv_over_torchvision": 3.0, "data_wait_fraction": 0.02}
# CIFAR-shaped synthetic data (always available offline) and the demo preset's small WRN-10-2, whose
# short CPU step makes data waits visible; pass a Config to measure another dataset or the paper's WRN-28-4.
DEFAULT_SETTINGS = {
    "data.dataset": "synthetic", "data.synthetic.train_size": 20000, "data.synthetic.test_size": 1000,
    "data.loader_workers": 2, "model.depth": 10, "model.widen_factor": 2, "train.batch_size": 128, "run.seed": 0,
}
WARMUP_STEPS = 3


def run_data_benchmark(cfg: Config | None = None, *, epochs: int = 2, train_steps: int = 20, json_out: str | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Measure and print the figures; also write them as JSON to `json_out`.

    Returns {"setup": {...}, "images_per_s": {"ffcv", "torchvision", "memory"}, "ffcv_over_torchvision",
    "ffcv_over_memory", "step": {"data_wait_fraction", "ffcv_step_s", "memory_step_s", "slowdown"},
    "targets", "meets_target"}.
    """
    cfg = cfg or validate(apply_overrides({}, DEFAULT_SETTINGS))
    # Torch threads as Ray sets them for a training worker: its CPU allotment.
    return run_benchmark(lambda: _measure(cfg, epochs, train_steps, log), format_table,
                         threads=max(1, int(cfg.scaling.cpus_per_worker)), json_out=json_out, log=log)


def _measure(cfg: Config, epochs: int, train_steps: int, log: Callable[[str], None]) -> dict:
    prepare(cfg.data, log)
    loaders = build_loaders(cfg, log=log)
    images, labels = _training_split(cfg)
    spec = loaders.spec
    normalized = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)

    def memory_loader(max_steps: int | None = None) -> TensorTrainLoader:
        return TensorTrainLoader(normalized, torch.from_numpy(labels), cfg.train.batch_size, rank=0, world_size=1,
                                 seed=cfg.run.seed, device=torch.device("cpu"), max_steps=max_steps)

    baseline = _torchvision_loader(images, labels, spec, cfg)

    throughput = _images_per_second({"ffcv": loaders.train, "torchvision": baseline, "memory": memory_loader()}, epochs)
    capped = validate(apply_overrides(cfg.to_dict(), {"train.max_steps_per_epoch": WARMUP_STEPS + train_steps}))
    steps = _training_steps(capped, spec, {"ffcv": build_loaders(capped, log=log).train, "memory": memory_loader(WARMUP_STEPS + train_steps)}, train_steps)
    (ffcv_wait, ffcv_step), (_, memory_step) = steps["ffcv"], steps["memory"]
    result = {
        "setup": {"dataset": cfg.data.dataset, "train_images": len(labels), "image_shape": list(images.shape[1:]),
                  "batch_size": cfg.train.batch_size, "workers": cfg.data.loader_workers, "epochs": epochs,
                  "model": f"WRN-{cfg.model.depth}-{cfg.model.widen_factor}", "train_steps": train_steps,
                  "torch_threads": torch.get_num_threads(), "device": "cpu", "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg()},  # other processes' load skews every figure
        "images_per_s": throughput,
        "ffcv_over_torchvision": throughput["ffcv"] / throughput["torchvision"],
        "ffcv_over_memory": throughput["ffcv"] / throughput["memory"],
        "step": {"data_wait_fraction": ffcv_wait, "ffcv_step_s": ffcv_step, "memory_step_s": memory_step,
                 "slowdown": ffcv_step / memory_step},
        "targets": dict(TARGETS),
    }
    result["meets_target"] = {
        "ffcv_over_torchvision": result["ffcv_over_torchvision"] >= TARGETS["ffcv_over_torchvision"],
        "data_wait_fraction": ffcv_wait < TARGETS["data_wait_fraction"],
    }
    return result


def format_table(result: dict) -> str:
    rate = result["images_per_s"]
    step = result["step"]
    return "\n".join([
        f"{'loader':<12} {'images/s':>10}",
        *(f"{name:<12} {rate[name]:>10.0f}" for name in ("ffcv", "torchvision", "memory")),
        f"FFCV / torchvision: {result['ffcv_over_torchvision']:.2f}x (target >= {TARGETS['ffcv_over_torchvision']:.0f}x)",
        f"FFCV / in-memory ceiling: {result['ffcv_over_memory']:.2f}",
        f"training step {step['ffcv_step_s']:.3f} s with FFCV, {step['memory_step_s']:.3f} s from memory; "
        f"waiting on data {100 * step['data_wait_fraction']:.2f}% (target < {100 * TARGETS['data_wait_fraction']:.0f}%)",
    ])


def _training_split(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The exact uint8 images and labels that `train.beton` holds."""
    source = load_source(cfg.data, log=lambda message: None)
    train, _ = split_train_val(len(source.train_labels), cfg.data.val_fraction, cfg.data.val_seed)
    return source.train_images[train], source.train_labels[train]


class _PILImages(Dataset):
    """What torchvision's CIFAR10 dataset does per sample: PIL image from the array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(pil), int(self.labels[index])


def _torchvision_loader(images: np.ndarray, labels: np.ndarray, spec, cfg: Config) -> DataLoader:
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in spec.mean], [s / 255 for s in spec.std]),
    ])
    return DataLoader(_PILImages(images, labels, transform), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.data.loader_workers, persistent_workers=True,
                      generator=torch.Generator().manual_seed(cfg.run.seed))


def _images_per_second(loaders: dict[str, Iterable], epochs: int) -> dict[str, float]:
    """Images per second of each loader over `epochs` full epochs, after one warm-up epoch each.

    The loaders take turns epoch by epoch, so load from other processes hits them alike.
    """
    for loader in loaders.values():  # warm-up: compilation, worker start-up, page cache
        for _ in loader:
            pass
    counts = dict.fromkeys(loaders, 0)
    seconds = dict.fromkeys(loaders, 0.0)
    for _ in range(epochs):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for images, _ in loader:
                counts[name] += len(images)
            seconds[name] += time.perf_counter() - start
    return {name: counts[name] / seconds[name] for name in loaders}


def _training_steps(cfg: Config, spec, loaders: dict[str, Iterable], steps: int) -> dict[str, tuple[float, float]]:
    """Per loader: (fraction of step time blocked on it, mean seconds per step) over `steps` steps.

    One seeded model per loader; the loaders take turns step by step, so load from other processes
    hits them alike. Each loader yields WARMUP_STEPS + steps batches and is iterated to its end.
    """
    runs = {}
    for name in loaders:
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, spec.channels, spec.num_classes)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), iter(loaders[name]))
    waiting = dict.fromkeys(loaders, 0.0)
    computing = dict.fromkeys(loaders, 0.0)
    for step in range(WARMUP_STEPS + steps):
        for name, (model, optimizer, batches) in runs.items():
            start = time.perf_counter()
            images, labels = next(batches)
            fetched = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            if step >= WARMUP_STEPS:
                waiting[name] += fetched - start
                computing[name] += time.perf_counter() - fetched
    for _, _, batches in runs.values():
        for _ in batches:  # end each epoch so no loader thread is left behind (there is nothing left)
            pass
    return {name: (waiting[name] / (waiting[name] + computing[name]), (waiting[name] + computing[name]) / steps) for name in loaders}
