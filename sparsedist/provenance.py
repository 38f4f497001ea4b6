"""What produced a run: package versions, the source commit, devices, world size and nodes.

Recorded by rank 0 at the start of every attempt (attempts.jsonl, the start banner) and copied into
summary.json, so a result can be traced to its code and hardware. Imports nothing heavy: versions come from package
metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PACKAGES = ("sparsedist", "ray", "ffcv", "numpy")
# Where the code travels without its repository (a Ray job's working_dir excludes .git), the driver or the
# user names the commit here; Ray Train workers get it from the driver (`launch.train.make_trainer`).
COMMIT_ENV = "SPARSEDIST_COMMIT"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_commit() -> str | None:
    """The git commit of the package's source tree (with "-dirty" if it has uncommitted changes); where the
    code travelled without its repository (a Ray runtime_env working_dir, a wheel), $SPARSEDIST_COMMIT, else None."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        # Only the package's own repository: installed into another project's tree, git would answer for it.
        top, commit = subprocess.run(["git", "-C", source, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                                     text=True, timeout=5, check=True).stdout.splitlines()
        if os.path.realpath(top) != os.path.realpath(source):
            return None
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(device: torch.device, world_size: int, nodes: int) -> dict[str, Any]:
    import torch  # here: `sparsedist --version` reads package_version without loading torch

    cuda = device.type == "cuda"
    return {
        # torch's own version string keeps the build tag (+cu130, +cpu) that package metadata drops.
        "versions": {"torch": torch.__version__, **{name: package_version(name) for name in PACKAGES}},
        "commit": source_commit(),
        "device": device.type,
        "cuda": torch.version.cuda,  # the CUDA torch was built for (None: a CPU build), whatever the device
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "world_size": world_size,
        "nodes": nodes,
    }


def banner(run_dir: str, tensorboard_dir: str, record: dict[str, Any]) -> str:
    """The start banner: where the run writes, how to watch it, and what it runs on."""
    versions = " ".join(f"{name} {version}" for name, version in record["versions"].items() if version)
    device = record["gpu"] or record["device"]
    return "\n".join([
        f"sparsedist run: {run_dir}",
        f"  TensorBoard: tensorboard --logdir {tensorboard_dir} --host 127.0.0.1",
        f"  workers: {record['world_size']} on {record['nodes']} node(s), device {device}"
        + (f" (CUDA {record['cuda']})" if record["gpu"] else ""),
        f"  versions: {versions}; commit {record['commit'] or 'unknown'}",
    ])
