"""The keep-ratio controller the training loop drives: a dense warm-up, then one strategy.

Called once per training batch, after it, with the all-reduced accuracy of the global batch, so every
replica computes the identical rho for the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsedist.config import (
    AdaptiveControllerConfig,
    ControllerConfig,
    CyclicControllerConfig,
    DenseControllerConfig,
    FixedControllerConfig,
)
from sparsedist.controllers.strategies import WARMUP, AdaptiveStrategy, ConstantStrategy, CyclicStrategy, Strategy


@dataclass(frozen=True)
class Decision:
    keep_ratio: float  # rho for the next batch
    event: str  # one of strategies.EVENTS


class Controller:
    """Dense for the first `warmup_steps` batches (accuracy not observed, so a dense warm-up cannot set
    the adaptive best EMA), then `strategy` from its initial state."""

    def __init__(self, strategy: Strategy, strategy_name: str, warmup_steps: int):
        self.strategy = strategy
        self.strategy_name = strategy_name
        self.warmup_steps = warmup_steps
        self.steps = 0

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup_steps

    @property
    def keep_ratio(self) -> float:
        return 1.0 if self.in_warmup else self.strategy.keep_ratio

    @property
    def next_step_may_change_keep_ratio(self) -> bool:
        """Whether the next `step` can return another rho: the last warm-up batch or a decision batch.

        The loop reads every other batch's accuracy later, without holding up the device: feeding the
        same accuracies in the same order, late, makes the same decisions."""
        if self.in_warmup:
            return self.steps + 1 == self.warmup_steps
        return self.strategy.next_observation_decides

    def step(self, global_accuracy: float) -> Decision:
        if not 0.0 <= global_accuracy <= 1.0:  # also rejects NaN, which would poison the EMA for good
            raise ValueError(f"global_accuracy must be in [0, 1], got {global_accuracy!r}")
        # The batch just finished ran at this rho; warm-up batches are not observed.
        observe = not self.in_warmup
        self.steps += 1
        event = self.strategy.observe(global_accuracy) if observe else WARMUP
        return Decision(self.keep_ratio, event)

    def state_dict(self) -> dict[str, float | int | str]:
        return {"strategy": self.strategy_name, "steps": self.steps, **self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, float | int | str]) -> None:
        if state["strategy"] != self.strategy_name:
            raise ValueError(f"state of a {state['strategy']!r} controller cannot load into {self.strategy_name!r}")
        self.steps = int(state["steps"])
        self.strategy.load_state_dict({k: v for k, v in state.items() if k not in ("strategy", "steps")})


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    # Nearest whole batch (Python's round: halves go to the even neighbour), not int()'s truncation,
    # so 0.999 epoch of 100 batches is 100 batches, not 99.
    return round(epochs * steps_per_epoch)


def resolve_interval(cfg: CyclicControllerConfig | AdaptiveControllerConfig, steps_per_epoch: int) -> int:
    """Batches between decisions: interval_epochs (if set) overrides interval, and is at least 1 batch."""
    if cfg.interval_epochs is None:
        return cfg.interval
    return max(1, epochs_to_steps(cfg.interval_epochs, steps_per_epoch))


def build_controller(cfg: ControllerConfig, steps_per_epoch: int) -> Controller:
    """The controller of a config section; epochs-valued fields are resolved into batches here."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if isinstance(cfg, DenseControllerConfig):
        strategy: Strategy = ConstantStrategy(1.0)
    elif isinstance(cfg, FixedControllerConfig):
        strategy = ConstantStrategy(cfg.keep_ratio)
    elif isinstance(cfg, CyclicControllerConfig):
        strategy = CyclicStrategy(cfg, resolve_interval(cfg, steps_per_epoch))
    elif isinstance(cfg, AdaptiveControllerConfig):
        strategy = AdaptiveStrategy(cfg, resolve_interval(cfg, steps_per_epoch))
    else:
        raise TypeError(f"unknown controller config {type(cfg).__name__}")
    return Controller(strategy, cfg.strategy, epochs_to_steps(cfg.warmup_epochs, steps_per_epoch))
