"""Rank 0's epoch reports from a Ray Train run to the Tune trial that drives it.

A Ray Train callback, running in the Train controller, puts rank 0's epoch metrics (all-reduced before
they are reported) and the checkpoint registered with them on a queue; the trial's own thread
takes them off while `fit()` runs in a second thread. This module stays light: Ray ships the callback to
the Train controller and every worker, which import it before anything else, so it must not pull in
FFCV, torchvision or the training code (seconds per process, on every trial's start).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

QUEUE_POLL_S = 1.0
# The one metric of a mid-epoch checkpoint's report (a preemption notice), which is not a Tune result.
MID_EPOCH_METRIC = "mid_epoch_checkpoint_step"


class ForwardReports(UserCallback):
    """Ray Train callback: (rank 0's metrics, registered checkpoint or None) onto the trial's queue. The
    checkpoint travels whole (its filesystem with its path): run directories may be in object storage."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if MID_EPOCH_METRIC not in metrics[0]:  # epochs only: the restart inside the Train run uses the others
            self.queue.put((metrics[0], checkpoint))


def fit_and_forward(trainer, queue: Queue, report: Callable[[dict[str, Any], Any], None]) -> None:
    """`trainer.fit()` in a thread, every forwarded report passed to `report` in this thread; fit's error re-raised."""
    failures: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the trial's thread, which Tune watches
            failures.append(error)

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    # The queue holds one report: the Train controller waits in `put` until this loop has taken the last one.
    while thread.is_alive() or not queue.empty():
        try:
            report(*queue.get(timeout=QUEUE_POLL_S))
        except Empty:
            continue
    if failures:
        raise failures[0]
