"""The datasets we know: image shape, classes and normalization statistics (pixel units, 0..255)."""

from __future__ import annotations

from sparsedist.config import DATASETS
from sparsedist.data import synthetic
from sparsedist.data.base import DatasetSpec

# Per-channel training-set statistics: the commonly published fractions times 255 (Fashion-MNIST's
# recomputed from the training images).
_FIXED_SPECS = {
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, mean=(125.31, 122.96, 113.86), std=(62.99, 62.09, 66.71)),
    "cifar100": DatasetSpec("cifar100", 3, 32, 100, mean=(129.31, 124.06, 112.43), std=(68.16, 65.38, 70.43)),
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, 28, 10, mean=(72.94,), std=(90.02,)),
}


def get_spec(data_cfg) -> DatasetSpec:
    """The spec of `data_cfg.dataset` (a `sparsedist.config.DataConfig`)."""
    name = data_cfg.dataset
    if name == "synthetic":
        s = data_cfg.synthetic
        # The generator's nominal centre and spread; RMSNorm makes the exact scale immaterial.
        return DatasetSpec("synthetic", s.channels, s.image_size, s.num_classes, (synthetic.MID,) * s.channels, (synthetic.SCALE,) * s.channels)
    if name not in _FIXED_SPECS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return _FIXED_SPECS[name]
