"""A real MLflow tracking server on 127.0.0.1 (SQLite backend in a temporary directory), for the tests."""

import contextlib
import os
import sys
import urllib.request
from pathlib import Path

from tests.distributed import free_port
from tests.servers import local_server

START_TIMEOUT_S = 90


@contextlib.contextmanager
def mlflow_server(directory: Path):
    """Yields the server's tracking URI; the server (this process's child, by pid) is stopped on exit."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               "--default-artifact-root", str(directory / "artifacts")]
    # No background job runner: the tests log and read runs only.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def healthy() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200

    with local_server(command, directory / "server.log", healthy, START_TIMEOUT_S, env=env):
        yield uri
