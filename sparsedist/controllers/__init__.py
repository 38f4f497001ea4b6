"""Keep-ratio controllers: rho for the next batch from the global batch accuracy (no torch, no I/O)."""

from sparsedist.controllers.controller import Controller, Decision, build_controller, resolve_interval
from sparsedist.controllers.strategies import COOLDOWN, EVENTS, HOLD, RELAX, RESET, TIGHTEN, WARMUP

__all__ = [
    "COOLDOWN",
    "EVENTS",
    "HOLD",
    "RELAX",
    "RESET",
    "TIGHTEN",
    "WARMUP",
    "Controller",
    "Decision",
    "build_controller",
    "resolve_interval",
]
