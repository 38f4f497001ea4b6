"""The few torch.distributed helpers the loop needs; all are no-ops without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all replicas (in place and returned), so every rank decides on the same numbers."""
    if world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_failures(failure: str | None) -> list[str]:
    """Every rank's failure message (None where it succeeded) gathered on every rank: the ranks decide together
    to stop, instead of the healthy ones waiting in their next collective until the process group times out."""
    failures: list[str | None] = [failure] * world()[1]
    if len(failures) > 1:
        dist.all_gather_object(failures, failure)
    return [message for message in failures if message is not None]
