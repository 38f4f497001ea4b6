"""The keep-ratio strategies: how rho moves with the observed global batch accuracy.

Each strategy is a small pure object with a `keep_ratio` (the rho for the next batch), `observe(accuracy)`
(called once per post-warm-up batch, returns the event of that step), `next_observation_decides` (whether
the next `observe` may change rho) and an exact `state_dict` round trip.
Warm-up is not their business: `Controller` holds it back until warm-up ends.
"""

from __future__ import annotations

import math
from typing import Protocol

from sparsedist.config import AdaptiveControllerConfig, CyclicControllerConfig

# Events, one per training batch.
WARMUP = "warmup"  # dense warm-up; the accuracy was not observed
HOLD = "hold"  # no decision this batch (or a strategy that never changes rho)
TIGHTEN = "tighten"  # rho lowered (also reported when rho already sits on its floor)
RELAX = "relax"  # rho raised after an accuracy drop, but not back to keep_max
RESET = "reset"  # rho returned to its top value (cyclic: keep_init; adaptive: keep_max)
COOLDOWN = "cooldown"  # a decision spent in the cooldown after a relax: no tightening
EVENTS = (WARMUP, HOLD, TIGHTEN, RELAX, RESET, COOLDOWN)

# The released script caps the drop-proportional growth of a relax at five relax steps.
MAX_RELAX_MULTIPLIER = 5.0


def _is_decision(observation: int, interval: int) -> bool:
    """Interval strategies decide on their interval-th, 2*interval-th, ... observation (counted from 1)."""
    return observation % interval == 0


class Strategy(Protocol):
    keep_ratio: float
    next_observation_decides: bool

    def observe(self, accuracy: float) -> str: ...
    def state_dict(self) -> dict[str, float | int]: ...
    def load_state_dict(self, state: dict[str, float | int]) -> None: ...


class ConstantStrategy:
    """dense (rho = 1) and fixed (rho = keep_ratio): rho never moves, every step is a "hold"."""

    next_observation_decides = False

    def __init__(self, keep_ratio: float):
        self.keep_ratio = keep_ratio

    def observe(self, accuracy: float) -> str:
        return HOLD

    def state_dict(self) -> dict[str, float | int]:
        return {}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        pass


class CyclicStrategy:
    """Non-adaptive reference: on every `interval`-th observed batch rho <- rho * (1 - rate) ("tighten");
    when that would fall below `floor`, rho <- keep_init instead ("reset"). Accuracy is ignored."""

    def __init__(self, cfg: CyclicControllerConfig, interval: int):
        self.cfg = cfg
        self.interval = interval
        self.keep_ratio = cfg.keep_init
        self.observed = 0

    @property
    def next_observation_decides(self) -> bool:
        return _is_decision(self.observed + 1, self.interval)

    def observe(self, accuracy: float) -> str:
        self.observed += 1
        if not _is_decision(self.observed, self.interval):
            return HOLD
        compressed = self.keep_ratio * (1 - self.cfg.rate)
        if compressed < self.cfg.floor:
            self.keep_ratio = self.cfg.keep_init
            return RESET
        self.keep_ratio = compressed
        return TIGHTEN

    def state_dict(self) -> dict[str, float | int]:
        return {"keep_ratio": self.keep_ratio, "observed": self.observed}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.keep_ratio = float(state["keep_ratio"])
        self.observed = int(state["observed"])


class AdaptiveStrategy:
    """The released script's controller: tighten while the accuracy EMA holds up, relax when it drops.

    Every observed batch: ema <- beta * ema + (1 - beta) * accuracy (the first observation sets ema =
    accuracy) and best <- max(best, ema); best is never reset. On the N-th, 2N-th, ... observed batch
    (counted from the end of warm-up) it decides, with drop = best - ema:
      - drop > drop_tol: relax, rho <- min(keep_max, rho + delta),
        delta = min(relax_step * min(1 + relax_gain * (drop - drop_tol) / drop_tol, 5), max_relax_jump)
        (a max_relax_jump of 0: no cap),
        and the next `cooldown` decisions only count down. The event is "reset" when rho lands on
        keep_max (with keep_max 1 that is back to dense), else "relax". A relax may happen during a
        cooldown; it restarts the cooldown.
      - else, in cooldown: one cooldown decision is spent ("cooldown"), rho unchanged.
      - else: tighten, rho <- max(keep_min, rho * (1 - tighten_pct)).
    Other batches are "hold". PAPER.md leaves open whether best is updated only at decisions; here it
    tracks every batch's EMA, as "best EMA so far" says.
    """

    def __init__(self, cfg: AdaptiveControllerConfig, interval: int):
        self.cfg = cfg
        self.interval = interval
        self.keep_ratio = cfg.keep_init
        self.observed = 0
        self.ema = 0.0  # meaningful once observed > 0
        self.best_ema = 0.0
        self.cooldown_left = 0

    @property
    def next_observation_decides(self) -> bool:
        return _is_decision(self.observed + 1, self.interval)

    def observe(self, accuracy: float) -> str:
        if self.observed == 0:
            self.ema = self.best_ema = accuracy
        else:
            self.ema = self.cfg.ema_beta * self.ema + (1 - self.cfg.ema_beta) * accuracy
            self.best_ema = max(self.best_ema, self.ema)
        self.observed += 1
        if not _is_decision(self.observed, self.interval):
            return HOLD
        return self._decide()

    def _decide(self) -> str:
        cfg = self.cfg
        drop = self.best_ema - self.ema
        if drop > cfg.drop_tol:
            growth = min(1 + cfg.relax_gain * (drop - cfg.drop_tol) / cfg.drop_tol, MAX_RELAX_MULTIPLIER)
            jump_cap = cfg.max_relax_jump or math.inf  # 0 means no cap, as in the released script
            self.keep_ratio = min(cfg.keep_max, self.keep_ratio + min(cfg.relax_step * growth, jump_cap))
            self.cooldown_left = cfg.cooldown
            return RESET if self.keep_ratio == cfg.keep_max else RELAX
        if self.cooldown_left:
            self.cooldown_left -= 1
            return COOLDOWN
        self.keep_ratio = max(cfg.keep_min, self.keep_ratio * (1 - cfg.tighten_pct))
        return TIGHTEN

    def state_dict(self) -> dict[str, float | int]:
        return {
            "keep_ratio": self.keep_ratio,
            "observed": self.observed,
            "ema": self.ema,
            "best_ema": self.best_ema,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.keep_ratio = float(state["keep_ratio"])
        self.observed = int(state["observed"])
        self.ema = float(state["ema"])
        self.best_ema = float(state["best_ema"])
        self.cooldown_left = int(state["cooldown_left"])
