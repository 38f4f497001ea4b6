"""A multi-host Ray cluster on this machine: every host a Linux network namespace with its own address on
a bridge and its own mount namespace (private `/tmp`, `/dev/shm` and so the node cache, a home of its
own, the project read-only as a node image would have it), an S3 server on its own host as the only
shared storage, token auth on every node.

    bridge sd<tag>br  10.<a>.<b>.1/24   (this machine: the user's laptop, where `ray job submit` runs)
    s3      .2   moto's S3 server
    head    .10  `ray start --head --num-cpus 0` (GCS, dashboard and job API on its own address)
    w1..    .11+ `ray start --address head:6379 --num-cpus 1`

Every server binds to its namespace's address. A host's processes are found by its network namespace
(`ip netns pids`), so teardown (and losing a host on purpose) ends exactly what the test started, then
deletes the namespaces and the bridge; `HostCluster.close` runs also when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
S3_PORT = 9000
DASHBOARD_PORT = 8265
GCS_PORT = 6379
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def namespaces_unavailable() -> str | None:
    """Why this machine cannot build the test bed, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"sdprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str  # the network namespace's name
    address: str
    link: str  # its veth end on the bridge, in the root namespace
    anchor: subprocess.Popen  # holds the mount namespace (private /tmp, /dev/shm) open
    env: dict[str, str] = field(repr=False)

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host: its network and mount namespaces, its environment."""
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "-n", "--", "env", "-i",
                *(f"{k}={v}" for k, v in self.env.items()), *argv]

    def run(self, *argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(pid) for pid in listed.split()]

    def kill(self) -> None:
        """Every process of the host SIGKILLed at once (the anchor too: its /tmp is gone with it)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.anchor.wait(timeout=30)

    def read_file(self, path: str) -> bytes:
        """A file from this host's private disk."""
        return subprocess.run(self.command("cat", path), capture_output=True, check=True).stdout

    def listing(self, path: str) -> list[str]:
        result = self.run("find", path, "-type", "f", check=False)
        return sorted(result.stdout.split()) if result.returncode == 0 else []


class HostCluster:
    """Build with `start()`, end with `close()` (kills every host and deletes the network)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:4]
        self.tag = f"sd{tag}"
        octets = int(tag, 16)
        self.prefix = f"10.{200 + octets % 50}.{octets // 50 % 250}"
        self.bridge = f"{self.tag}br"
        self.gateway = f"{self.prefix}.1"
        self.token = secrets.token_hex(32)
        self._stages = tempfile.mkdtemp(prefix=f"{self.tag}-hosts-")  # where each host's /tmp is built (empty after)
        self.hosts: dict[str, Host] = {}  # the live ones
        self.made: list[Host] = []  # every host ever made, lost ones included: what close() deletes
        self._next_address = 10
        self.s3_endpoint = f"http://{self.prefix}.2:{S3_PORT}"
        self.head_address = f"{self.prefix}.{self._next_address}"
        self.dashboard = f"http://{self.head_address}:{DASHBOARD_PORT}"

    # ------------------------------------------------------------------ the environment of every process
    def client_env(self) -> dict[str, str]:
        """What a process on this machine (outside the cluster) needs to reach the job API and the bucket."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.s3_endpoint}

    def _host_env(self) -> dict[str, str]:
        return {**self.client_env(), "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "HOME": "/tmp/home", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                # Ray Train's watcher sees a drained node within 0.5 s, not 5 s: the test runs' epochs take seconds.
                "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
                # A host that vanished is declared dead after about 3 s, not Ray's default 15-30 s.
                "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3"}

    # ------------------------------------------------------------------ building
    def start(self, workers: int) -> "HostCluster":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        s3 = self._add_host("s3", f"{self.prefix}.2")
        self.s3 = subprocess.Popen(s3.command(str(VENV_BIN / "moto_server"), "-H", s3.address, "-p", str(S3_PORT)),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        head = self.add_ray_host("head", head=True)
        assert head.address == self.head_address
        for index in range(1, workers + 1):
            self.add_ray_host(f"w{index}")
        self._wait_for_nodes(workers + 1)
        return self

    def _add_host(self, name: str, address: str) -> Host:
        namespace, link = f"{self.tag}-{name}", f"{self.tag}{name}"
        _ip("netns", "add", namespace)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", link, "master", self.bridge, "up")
        for args in (["addr", "add", f"{address}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                     ["link", "set", "lo", "up"]):
            _ip("-n", namespace, *args)
        # /tmp and /dev/shm private, the project read-only at its own path: what its own disk and a node image
        # give. The new /tmp is built aside and moved into place, so a project under /tmp (a CI clone) stays.
        stage = tempfile.mkdtemp(prefix=f"{self.tag}-{name}-", dir=self._stages)
        inside = os.path.join(stage, os.path.relpath(REPO, "/tmp")) if REPO.is_relative_to("/tmp") else str(REPO)
        script = (f"mount -t tmpfs -o mode=1777 tmpfs {stage} && mkdir -p {inside} {stage}/home && "
                  f"mount --bind {REPO} {inside} && mount -o remount,bind,ro {inside} && "
                  f"mount --move {stage} /tmp && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                  "echo ready && exec sleep infinity")
        anchor = subprocess.Popen(["ip", "netns", "exec", namespace, "unshare", "-m", "--propagation", "private",
                                   "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        if anchor.stdout.readline().strip() != "ready":
            raise RuntimeError(f"host {name}: could not set up its mounts")
        host = Host(namespace, address, link, anchor, self._host_env())
        self.hosts[name] = host
        self.made.append(host)
        return host

    def add_ray_host(self, name: str, head: bool = False) -> Host:
        host = self._add_host(name, f"{self.prefix}.{self._next_address}")
        self._next_address += 1
        common = ["--node-ip-address", host.address, "--object-store-memory", str(OBJECT_STORE_BYTES),
                  "--disable-usage-stats"]
        if head:
            host.run("ray", "start", "--head", "--port", str(GCS_PORT), "--num-cpus", "0",
                     "--dashboard-host", host.address, "--dashboard-port", str(DASHBOARD_PORT), *common)
        else:
            host.run("ray", "start", "--address", f"{self.head_address}:{GCS_PORT}", "--num-cpus", "1", *common)
        return host

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        script = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        while True:
            result = self.hosts["head"].run(sys.executable, "-c", script, check=False, timeout=60)
            if result.returncode == 0 and int(result.stdout.strip().splitlines()[-1]) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} Ray nodes did not come up: {result.stdout}\n{result.stderr}")
            time.sleep(1)

    # ------------------------------------------------------------------ using
    def lose(self, name: str) -> None:
        """A whole host gone at once: every process SIGKILLed, its link cut."""
        host = self.hosts.pop(name)
        host.kill()
        _ip("link", "set", host.link, "down")

    def close(self) -> None:
        for host in list(self.hosts.values()):
            host.kill()
        if hasattr(self, "s3"):
            self.s3.wait(timeout=30)
        for host in self.made:
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self._stages, ignore_errors=True)
        self.hosts.clear()
        self.made.clear()
