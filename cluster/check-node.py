"""Fail a node's setup, not the first job on it, when it cannot run sparsedist.

Always: FFCV's extension loads (its system libraries are there) and the training entry point imports.
With --gpu (a GPU node of the launcher configs): the pinned torch sees a GPU through this node's driver (a
CUDA 13 build needs driver R580 or newer) and one NCCL all-reduce runs.

    python cluster/check-node.py [--gpu]
"""

from __future__ import annotations

import argparse
import sys


def check_imports() -> str:
    import ffcv  # noqa: F401  (its compiled extension links OpenCV and libjpeg-turbo)
    import sparsedist.launch.train  # noqa: F401
    import torch

    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), ffcv and sparsedist import"


def all_reduce_once(backend: str, device) -> None:
    """One all-reduce in a one-process group of `backend` on `device`."""
    import torch
    import torch.distributed as dist

    accelerator = device if device.type != "cpu" else None  # NCCL binds its device up front
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=accelerator)
    try:
        value = torch.ones(1, device=device)
        dist.all_reduce(value)
        if value.item() != 1:
            raise RuntimeError(f"a one-process {backend} all-reduce of 1 gave {value.item()}")
    finally:
        dist.destroy_process_group()


def check_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: is the "
                           "driver older than that CUDA needs? (nvidia-smi prints the newest CUDA the driver runs)")
    all_reduce_once("nccl", torch.device("cuda", 0))
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return f"{torch.cuda.get_device_name(0)}, NCCL {nccl}: all-reduce ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="also require a working GPU and NCCL")
    args = parser.parse_args()
    try:
        print("node check:", check_imports())
        if args.gpu:
            print("node check:", check_gpu())
    except Exception as error:  # the message is the point: setup logs are read by people
        print(f"node check failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
