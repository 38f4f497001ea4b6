"""Benchmarks behind `sparsedist bench ...`: measurements, not tests."""

from __future__ import annotations

import json
from typing import Callable

import torch


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
