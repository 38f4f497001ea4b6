"""The FFCV names this package uses, imported without FFCV's side effect on torch's thread count.

FFCV calls torch.set_num_threads with its own thread count when `ffcv.pipeline.compiler` is
imported (1) and whenever a Loader is built or iterated; the trainer's setting must win.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def keeping_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


with keeping_torch_threads():
    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

__all__ = [
    "MIN_PAGE_SIZE", "DatasetWriter", "IntDecoder", "IntField", "Loader", "NDArrayDecoder", "NDArrayField", "OrderOption",
    "Reader", "Squeeze", "ToDevice", "ToTensor", "ToTorchImage", "keeping_torch_threads",
]
