"""Which Ray cluster a launch runs on: the one RAY_ADDRESS names (`ray job submit` sets it for the
entrypoint), or an embedded single-node cluster on the loopback interface.

`ray` is imported inside the functions: the embedded cluster's environment must be set before Ray's
first import in the process (Ray reads it into module constants). A process that imported Ray earlier
gets Ray's defaults for an embedded cluster (token auth on, services on the routable address).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from sparsedist.config import ScalingConfig

EMBEDDED_ENV = {
    # Ray's single-node mode (its macOS/Windows default) puts the node address, and so every service,
    # on 127.0.0.1; otherwise Ray resolves even an explicit 127.0.0.1 to the routable address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray 2.60 turns token auth on for new local clusters; saying so explicitly keeps a later
    # `ray start --head` on this machine and its clients in agreement.
    "RAY_AUTH_MODE": "token",
    # Ray Train's controller polls its workers every 2 s by default: a run's start and end wait for a poll,
    # seconds per sweep trial (`sparsedist bench sweep`). Its processes inherit this from the embedded cluster.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
REACH_TIMEOUT_S = 5.0
# How long a launch on an existing cluster waits for workers to join (or the autoscaler to add them)
# before giving up. An embedded cluster never grows, so it does not wait.
RESOURCE_WAIT_S = 600.0


class ClusterError(RuntimeError):
    """The cluster cannot run this launch: unreachable, or too small for the scaling config."""


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail within seconds when RAY_ADDRESS points nowhere, instead of Ray's long connection retries."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address: `ray job submit` takes it, a "
            "training driver needs the cluster's GCS address (host:6379). Submit with `ray job submit` "
            "(see docs/ray.md) or unset RAY_ADDRESS to train on an embedded local cluster."
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} (RAY_ADDRESS) within {timeout_s:.0f}s: {error}. "
            "Check the address and that the cluster is up (`ray status`), or unset RAY_ADDRESS to train on "
            "an embedded local cluster."
        ) from None


def required_resources(scaling: ScalingConfig) -> dict[str, float]:
    required = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        required["GPU"] = float(scaling.num_workers)
    return required


def shortfall(required: dict[str, float], available: dict[str, float]) -> str | None:
    """A sentence naming every resource the cluster lacks, or None."""
    lacking = [f"{amount:g} {name} (the cluster has {available.get(name, 0):g})"
               for name, amount in required.items() if available.get(name, 0) < amount]
    return "; ".join(lacking) or None


def wait_for_resources(scaling: ScalingConfig, timeout_s: float, log: Callable[[str], None] = print,
                       poll_s: float = 5.0) -> None:
    """Return once the cluster holds the resources the workers need; ClusterError after timeout_s."""
    import ray

    required = required_resources(scaling)
    deadline = time.monotonic() + timeout_s
    announced = False
    while (missing := shortfall(required, ray.cluster_resources())) is not None:
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"scaling.num_workers={scaling.num_workers} (use_gpu={scaling.use_gpu}, cpus_per_worker="
                f"{scaling.cpus_per_worker:g}) needs {missing}. Lower scaling.num_workers or "
                "scaling.cpus_per_worker, or add nodes."
            )
        if not announced:
            log(f"waiting up to {timeout_s:.0f}s for the cluster to provide {missing}")
            announced = True
        time.sleep(poll_s)


@contextmanager
def ray_session(scaling: ScalingConfig, *, resource_wait_s: float = RESOURCE_WAIT_S,
                log_to_driver: bool = True) -> Iterator[None]:
    """Connect to RAY_ADDRESS's cluster, or start an embedded one on 127.0.0.1 (stopped on exit); a Ray
    session already open in this process (tests, Tune) is used as it is and left open."""
    address = os.environ.get("RAY_ADDRESS") or None
    already_open = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if address is not None and not already_open:
        check_reachable(address)
    if address is None and "ray" not in sys.modules:
        # Set after Ray's import, these would reach the services it starts but not its own cached view.
        for name, value in EMBEDDED_ENV.items():
            os.environ.setdefault(name, value)
    import ray

    if not already_open:
        ray.init(address=address or "local", log_to_driver=log_to_driver)
    try:
        # An embedded cluster never grows: only a cluster we attach to is worth waiting for.
        wait_for_resources(scaling, resource_wait_s if address else 0.0)
        yield
    finally:
        if not already_open:
            ray.shutdown()
