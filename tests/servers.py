"""Real servers the tests start on 127.0.0.1 (MLflow, TensorBoard): started as this process's children,
waited for until they answer, stopped by pid."""

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def local_server(command: list[str], log_path: Path, answers: Callable[[], bool], start_timeout_s: float,
                 env: dict[str, str] | None = None):
    """Runs `command` (output to `log_path`) until the block ends; enters once `answers()` is true, and
    fails with the log's tail if the server exits or `start_timeout_s` passes first."""
    log = open(log_path, "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if answers():
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
