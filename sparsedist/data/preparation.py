"""Write a dataset's train/val/test `.beton` files once: atomically, with a manifest, under a file lock.

Layout: `<data.root>/<dataset>-<digest>/{train,val,test}.beton` plus `manifest.json`, where the
digest covers everything that decides the files' content (dataset, split settings, synthetic
settings, writer version), so different settings never overwrite each other.

Protocol: the manifest is the completion marker. A build takes an exclusive `flock` on the
directory's lock file (every other process on the node waits on it, so there is never a second
writer), deletes the manifest, writes each file under a temporary name, fsyncs and renames it,
and writes the manifest last. A reader trusts the files only when the manifest matches the
requested settings and every file has the recorded size, sample count and SHA-256; anything else
is rebuilt from the source (or reported, naming what to download, when the source is gone).
Locks are node-local: on shared storage across nodes, prepare once before starting the workers.

Object storage: with `data.root` a URI (s3://..., gs://...), the same directory lives in the bucket
and every node keeps a verified local copy in its cache (FFCV memory-maps local files). The first
`prepare` anywhere builds locally and uploads, manifest last; later ones on other nodes fetch the
files under the same lock and verify them against the fetched manifest before trusting them.
FFCV's writer runs its workers with the process's multiprocessing start method: with fork (the
Linux default) a small set takes a second; under spawn or forkserver every file also pays for a
fresh interpreter that imports FFCV (seconds each).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sparsedist import storage
from sparsedist.atomic import fsync_path, write_atomic
from sparsedist.data._ffcv import MIN_PAGE_SIZE, DatasetWriter, IntField, NDArrayField, Reader
from sparsedist.data.sources import DataUnavailableError, SourceData, load_source

WRITER_VERSION = 1  # bump when the file layout changes: old directories are then ignored
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedPaths:
    directory: Path
    train: Path
    val: Path | None  # None when data.val_fraction is 0
    test: Path
    counts: dict[str, int]  # examples per prepared split, from the verified manifest


def identity(data_cfg) -> dict[str, Any]:
    """Everything that decides the content of the prepared files."""
    settings = {"dataset": data_cfg.dataset, "writer_version": WRITER_VERSION, "val_fraction": data_cfg.val_fraction, "val_seed": data_cfg.val_seed}
    if data_cfg.dataset == "synthetic":
        settings["synthetic"] = data_cfg.synthetic.model_dump(mode="json")
    return settings


def prepared_name(data_cfg) -> str:
    digest = hashlib.sha256(json.dumps(identity(data_cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{data_cfg.dataset}-{digest}"


def prepared_dir(data_cfg) -> Path:
    """Where the loaders read the files: under data.root, or for a URI root under this node's cache."""
    return Path(storage.working_dir(data_cfg.root, "data")) / prepared_name(data_cfg)


def prepare(data_cfg, log: Callable[[str], None] = print) -> PreparedPaths:
    """Make sure the verified .beton files for `data_cfg` (a `sparsedist.config.DataConfig`) exist; return their paths.

    A no-op when they already verify. Concurrent callers on one node wait for the single writer.
    Raises DataUnavailableError when a build is needed and no source can be found, StorageError when an
    object-store data.root cannot be written.
    """
    directory = prepared_dir(data_cfg)
    remote = storage.join(data_cfg.root, prepared_name(data_cfg)) if storage.is_uri(data_cfg.root) else None
    expected = identity(data_cfg)
    problem = find_problem(directory, expected)
    unpublished = problem is None and remote is not None and not storage.is_file(storage.join(remote, MANIFEST))
    if problem is not None or unpublished:
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(directory / ".lock", log):
            problem = find_problem(directory, expected)  # the process we waited for may have built it
            if problem is None and unpublished:  # ... and published it
                unpublished = not storage.is_file(storage.join(remote, MANIFEST))
            if problem is not None and not (remote is not None and _fetch(remote, directory, expected, log)):
                if remote is not None:
                    storage.check_usable(data_cfg.root)  # a bad bucket fails before the build, not after
                _build(directory, data_cfg, expected, problem, log)
                unpublished = remote is not None
            if unpublished:  # built here, by now or by an earlier run whose upload failed
                _publish(directory, remote, log)
    counts = {split: record["count"] for split, record in read_manifest(directory)["splits"].items()}
    paths = {split: directory / f"{split}.beton" if split in counts else None for split in SPLITS}
    return PreparedPaths(directory, paths["train"], paths["val"], paths["test"], counts)


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def find_problem(directory: Path, expected_identity: dict[str, Any]) -> str | None:
    """Why the prepared files cannot be used as they are, or None when they verify."""
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return "not prepared yet (no manifest)"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    if manifest.get("identity") != expected_identity:
        return "the manifest describes other settings"
    for split, record in manifest["splits"].items():
        path = directory / f"{split}.beton"
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, the manifest says {record['bytes']} (truncated or overwritten)"
        if _sha256(path) != record["sha256"]:
            return f"{path.name} does not match its recorded checksum (corrupted)"
        if Reader(str(path)).num_samples != record["count"]:
            return f"{path.name} does not hold the {record['count']} examples of the manifest"
    return None


def split_train_val(num_examples: int, val_fraction: float, val_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, fixed holdout of the official training set: (train indices, val indices), each sorted."""
    permutation = np.random.default_rng(val_seed).permutation(num_examples)
    num_val = int(round(num_examples * val_fraction))
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


# --------------------------------------------------------------------------------------- build
@contextmanager
def _exclusive_lock(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path.parent}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(directory: Path, data_cfg, expected_identity: dict[str, Any], problem: str, log: Callable[[str], None]) -> None:
    log(f"preparing {data_cfg.dataset} in {directory}: {problem}")
    try:
        source = load_source(data_cfg, log)
    except DataUnavailableError as error:
        if not problem.startswith("not prepared"):
            raise DataUnavailableError(f"{directory} must be rebuilt ({problem}) but its source is unavailable: {error}") from error
        raise
    (directory / MANIFEST).unlink(missing_ok=True)  # until the new manifest lands, nothing here is trusted
    splits = _split(source, data_cfg)
    records = {}
    for split, (images, labels) in splits.items():
        path = directory / f"{split}.beton"
        _write_beton(path, images, labels, workers=data_cfg.loader_workers)
        records[split] = {"file": path.name, "count": len(labels), "shape": list(images.shape[1:]), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        log(f"  {split}: {len(labels)} examples of shape {images.shape[1:]} -> {path}")
    manifest = {"identity": expected_identity, "source": source.origin, "source_checksum": source.checksum(), "splits": records}
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())


def _fetch(remote: str, directory: Path, expected_identity: dict[str, Any], log: Callable[[str], None]) -> bool:
    """Copy the prepared files from object storage into the node cache; False when the storage holds none
    for these settings. DataUnavailableError when the copy does not verify against its manifest."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(remote, MANIFEST)))
    except FileNotFoundError:
        return False
    if manifest.get("identity") != expected_identity:
        return False
    log(f"fetching {remote} into the node cache {directory}")
    (directory / MANIFEST).unlink(missing_ok=True)
    for record in manifest["splits"].values():
        storage.download(storage.join(remote, record["file"]), str(directory / record["file"]))
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    problem = find_problem(directory, expected_identity)
    if problem is not None:
        (directory / MANIFEST).unlink()
        raise DataUnavailableError(f"the prepared files at {remote} do not verify ({problem}); delete {remote} "
                                   "and prepare again: sparsedist data prepare --root <data.root>")
    return True


def _publish(directory: Path, remote: str, log: Callable[[str], None]) -> None:
    """Upload freshly built files, the manifest last: other nodes trust nothing before it lands."""
    manifest = read_manifest(directory)
    for record in manifest["splits"].values():
        storage.upload(str(directory / record["file"]), storage.join(remote, record["file"]))
    storage.upload(str(directory / MANIFEST), storage.join(remote, MANIFEST))
    log(f"  uploaded to {remote}")


def _split(source: SourceData, data_cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    train, val = split_train_val(len(source.train_labels), data_cfg.val_fraction, data_cfg.val_seed)
    splits = {
        "train": (source.train_images[train], source.train_labels[train]),
        "val": (source.train_images[val], source.train_labels[val]),
        "test": (source.test_images, source.test_labels),
    }
    return {split: arrays for split, arrays in splits.items() if len(arrays[1])}


class _Examples:
    """The indexable (image, label) view DatasetWriter reads from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def _write_beton(path: Path, images: np.ndarray, labels: np.ndarray, workers: int) -> None:
    # Raw uint8 pixels (H x W x C) so they round-trip exactly; the smallest page keeps tiny sets small.
    fields = {"image": NDArrayField(np.dtype("uint8"), images.shape[1:]), "label": IntField()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        DatasetWriter(str(temporary), fields, page_size=MIN_PAGE_SIZE, num_workers=workers).from_indexed_dataset(_Examples(images, labels))
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
