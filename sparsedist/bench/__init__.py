"""Benchmarks behind `sparsedist bench ...`: measurements, not tests."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch


def median_latencies(paths: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     synchronize: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median milliseconds of each callable, without autograd; the callables take turns within every
    repeat. `synchronize` (a device's, for asynchronous devices) runs before and after each call."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for repeat in range(warmup + repeats):
            for name, run in paths.items():
                synchronize()
                start = time.perf_counter()
                run()
                synchronize()
                if repeat >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def run_benchmark(measure: Callable[[], dict], format_table: Callable[[dict], str], *, threads: int | None,
                  json_out: str | None, log: Callable[[str], None] = print) -> dict:
    """Run `measure` with `threads` torch threads (restored afterwards), print its table, maybe write JSON."""
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = measure()
    finally:
        torch.set_num_threads(threads_before)
    log(format_table(result))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result
