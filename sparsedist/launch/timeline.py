"""Wall-clock times of a sweep's trial events, recorded in the Tune driver (`sparsedist bench sweep`)."""

from __future__ import annotations

import time

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
