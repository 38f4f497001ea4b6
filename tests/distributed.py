"""Run a function on N real gloo processes (CPU) and collect what each rank returns."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 300) -> list[Any]:
    """Spawn `world_size` processes running fn(rank, world_size, *args) in a gloo group.

    fn must be a module-level function (it is pickled); its return values must be picklable.
    """
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [context.Process(target=_entry, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                raise TimeoutError(f"gloo rank did not finish within {timeout}s")
        outcomes = [results.get(r, ("error", f"rank {r} exited with code {procs[r].exitcode}")) for r in range(world_size)]
    errors = [f"rank {r}:\n{detail}" for r, (status, detail) in enumerate(outcomes) if status == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [value for _, value in outcomes]
