"""Tune callbacks in the sweep driver: wall-clock times of trial events (`sparsedist bench sweep`), and an
action after every trial (partial results)."""

from __future__ import annotations

import sys
import time
from typing import Callable

from ray.tune import Callback


class TrialTimeline(Callback):
    """Appends (event, trial_id, time.time()) for each trial's start, every result and its completion."""

    def __init__(self, events: list[tuple[str, str, float]]):
        self.events = events

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.events.append(("start", trial.trial_id, time.time()))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.events.append(("result", trial.trial_id, time.time()))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.events.append(("complete", trial.trial_id, time.time()))


class TrialEnd(Callback):
    """Calls `action()` after each trial ends (a picklable callable: Tune saves its callbacks for a resume).
    A failing action is reported and the sweep goes on: it only refreshes a view of the results."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        try:
            self.action()
        except Exception as error:  # noqa: BLE001 - a view of partial results must not end a long sweep
            print(f"warning: after trial {trial.trial_id}: {type(error).__name__}: {error}", file=sys.stderr)
