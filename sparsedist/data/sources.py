"""Raw datasets as uint8 arrays: where each one comes from, how it is decoded and validated.

Every dataset resolves its source in the same order: `data.source` when set (and then only that),
an earlier download under `<root>/raw/<name>`, a system-wide copy (Fashion-MNIST's Debian
package), and last torchvision's download when `data.download` allows it. Sources are validated
by their decoded content (magic numbers, shapes, label ranges), never by file checksums: the
Debian Fashion-MNIST gzip files differ byte-wise from upstream's, and test fixtures are miniature.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sparsedist import storage
from sparsedist.data import synthetic

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu `dataset-fashion-mnist`
IDX_FILES = {  # (images, labels) per split, as upstream names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_CLASSES = {"cifar10": ("CIFAR10", 10), "cifar100": ("CIFAR100", 100)}  # torchvision's dataset class, classes


def _torchvision_dataset(class_name: str) -> type:
    """torchvision's dataset class (its file names, URLs and checked download): imported only where an
    archive is read, since torchvision takes a second to import in every training worker."""
    import torchvision.datasets

    return getattr(torchvision.datasets, class_name)


class DataUnavailableError(RuntimeError):
    """No usable copy of a dataset; the message names what to download or install and where to put it."""


@dataclass(frozen=True)
class SourceData:
    """A decoded dataset: images N x H x W x C uint8, labels int64, plus where it was read from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str

    def checksum(self) -> str:
        """SHA-256 of the decoded content (shapes, pixels, labels): independent of the file encoding."""
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(repr(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def load_source(data_cfg, log: Callable[[str], None] = print) -> SourceData:
    """Decode `data_cfg.dataset` (a `sparsedist.config.DataConfig`) from the first source that has it."""
    name = data_cfg.dataset
    if name == "synthetic":
        return _generate_synthetic(data_cfg.synthetic)
    if name in CIFAR_CLASSES:
        return _load_cifar(name, data_cfg, log)
    if name == "fashion-mnist":
        return _load_fashion_mnist(data_cfg, log)
    raise ValueError(f"no source reader for dataset {name!r}")


def raw_dir(data_cfg) -> Path:
    """Downloads go under data.root, or for an object-store root under the node's cache (only the
    prepared files are uploaded)."""
    return Path(storage.working_dir(data_cfg.root, "data")) / "raw" / data_cfg.dataset


# ---------------------------------------------------------------------------------- synthetic
def _generate_synthetic(s) -> SourceData:
    params = (s.num_classes, s.image_size, s.channels, s.noise, s.seed)
    train = synthetic.generate(s.train_size, *params, stream=0)
    test = synthetic.generate(s.test_size, *params, stream=1)
    return SourceData(*train, *test, origin=f"synthetic generator (seed {s.seed})")


# ----------------------------------------------------------------------------------- resolving
def _resolve(data_cfg, local_copies: list[Path], is_usable: Callable[[Path], bool], download: Callable[[], Path], help_text: str, log) -> Path:
    """The first usable local copy, else a fresh download; DataUnavailableError when neither works."""
    if data_cfg.source:
        source = Path(data_cfg.source)
        if not is_usable(source):
            raise DataUnavailableError(f"data.source {source} does not hold {data_cfg.dataset}. {help_text}")
        return source
    for candidate in local_copies:
        if is_usable(candidate):
            return candidate
    if not data_cfg.download:
        raise DataUnavailableError(f"{data_cfg.dataset}: no local copy and downloading is off (data.download: false). {help_text}")
    log(f"downloading {data_cfg.dataset} into {raw_dir(data_cfg)}")
    try:
        return download()
    except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
        raise DataUnavailableError(f"{data_cfg.dataset}: no local copy and the download failed ({error}). {help_text}") from error


# --------------------------------------------------------------------------------------- CIFAR
def _load_cifar(name: str, data_cfg, log) -> SourceData:
    class_name, num_classes = CIFAR_CLASSES[name]
    tv_class = _torchvision_dataset(class_name)
    home = raw_dir(data_cfg)
    help_text = (
        f"Download {tv_class.url} and put it at {home / tv_class.filename} (or its extracted folder at "
        f"{home / tv_class.base_folder}), or point data.source (--source) at the archive or folder."
    )

    def download() -> Path:
        tv_class(str(home), train=False, download=True)  # verifies torchvision's MD5 of the archive
        return home / tv_class.base_folder

    def is_usable(path: Path) -> bool:
        return path.is_file() or (path / tv_class.base_folder).is_dir() or (path.name == tv_class.base_folder and path.is_dir())

    source = _resolve(data_cfg, [home / tv_class.base_folder, home / tv_class.filename], is_usable, download, help_text, log)
    try:
        files = _read_cifar_files(source, tv_class.base_folder, [f for f, _ in tv_class.train_list + tv_class.test_list])
        train = _decode_cifar_batches([files[f] for f, _ in tv_class.train_list], num_classes)
        test = _decode_cifar_batches([files[f] for f, _ in tv_class.test_list], num_classes)
    except (KeyError, OSError, pickle.UnpicklingError, ValueError, tarfile.TarError) as error:
        raise DataUnavailableError(f"{name}: {source} is not a readable CIFAR python archive ({error!r}). {help_text}") from error
    return SourceData(*train, *test, origin=str(source))


def _read_cifar_files(source: Path, base_folder: str, file_names: list[str]) -> dict[str, bytes]:
    """`<base_folder>/<file>` for each file, from the .tar.gz archive or the (parent of the) extracted folder."""
    if source.is_file():
        with tarfile.open(source, "r:*") as archive:
            return {name: archive.extractfile(f"{base_folder}/{name}").read() for name in file_names}
    folder = source if source.name == base_folder else source / base_folder
    return {name: (folder / name).read_bytes() for name in file_names}


def _decode_cifar_batches(blobs: list[bytes], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for blob in blobs:
        # The official files are Python 2 pickles (as torchvision reads them); they hold only arrays and lists.
        entry = pickle.loads(blob, encoding="latin1")
        data = np.asarray(entry["data"])
        batch_labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise ValueError(f"unexpected batch layout: data {data.dtype}{data.shape}, {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    _check_labels(labels, num_classes)
    return np.ascontiguousarray(np.concatenate(images)), labels


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}: {labels.min()}..{labels.max()}")


# --------------------------------------------------------------------------------- Fashion-MNIST
def _load_fashion_mnist(data_cfg, log) -> SourceData:
    home = raw_dir(data_cfg)
    fashion_mnist = _torchvision_dataset("FashionMNIST")
    torchvision_dir = home / fashion_mnist.__name__ / "raw"  # where torchvision's download lands
    names = ", ".join(f"{file}.gz" for pair in IDX_FILES.values() for file in pair)
    help_text = (
        f"Install the Debian/Ubuntu package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist; "
        f"it puts the files in {FASHION_MNIST_SYSTEM_DIR}), or download {names} from {fashion_mnist.mirrors[0]} "
        f"into {home}, or point data.source (--source) at a folder holding them."
    )

    def download() -> Path:
        fashion_mnist(str(home), train=False, download=True)  # verifies torchvision's MD5 of each file
        return torchvision_dir

    source = _resolve(data_cfg, [home, torchvision_dir, FASHION_MNIST_SYSTEM_DIR], _has_idx_files, download, help_text, log)
    try:
        train, test = (_read_idx_split(source, *IDX_FILES[split]) for split in ("train", "test"))
    except (OSError, ValueError, EOFError) as error:
        raise DataUnavailableError(f"fashion-mnist: {source} holds unreadable IDX files ({error}). {help_text}") from error
    return SourceData(*train, *test, origin=str(source))


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(folder: Path) -> bool:
    return folder.is_dir() and all(_idx_path(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def _read_idx_split(folder: Path, images_stem: str, labels_stem: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(_idx_path(folder, images_stem))
    labels = _read_idx(_idx_path(folder, labels_stem)).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} are not N x 28 x 28 and N")
    _check_labels(labels, 10)
    return images[..., None], labels


def _read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (gzip or plain): 2 zero bytes, type code 0x08 (uint8), rank, big-endian dims."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))
    payload = np.frombuffer(raw, np.uint8, offset=4 + 4 * rank)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {payload.size} bytes of data for dimensions {dims}")
    return payload.reshape(dims)
