"""Cluster addresses that cannot work fail within seconds with an error that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sparsedist.launch.cluster import ClusterError, check_reachable, shortfall
from tests.distributed import free_port


def test_unreachable_cluster_address_fails_the_command_within_seconds(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "RAY_ADDRESS": address}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "sparsedist.launch.train", "--config", "smoke",
                             "--run-dir", str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'data'}"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: cannot reach the Ray cluster at {address} (RAY_ADDRESS)" in result.stderr
    assert "unset RAY_ADDRESS" in result.stderr
    assert time.monotonic() - started < 60  # python start-up and imports included
    assert not (tmp_path / "run").exists()  # nothing half-made to refuse on the next attempt


def test_dashboard_address_is_not_taken_for_a_cluster_address():
    with pytest.raises(ClusterError, match="dashboard .* address: `ray job submit` takes it"):
        check_reachable("http://127.0.0.1:8265")


def test_shortfall_names_every_missing_resource():
    assert shortfall({"CPU": 8.0, "GPU": 4.0}, {"CPU": 2.0}) == "8 CPU (the cluster has 2); 4 GPU (the cluster has 0)"
    assert shortfall({"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}) is None
