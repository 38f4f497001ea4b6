"""The FFCV data pipeline on real .beton files: preparation, sources, sharding, pixels, augmentation."""

from __future__ import annotations

import fcntl
import hashlib
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from sparsedist.config import DATASETS, ConfigError, load_config
from sparsedist.data import DataUnavailableError, build_loaders, get_spec, prepare
from sparsedist.data.loaders import RandomCropFlip
from sparsedist.data.preparation import find_problem, identity, prepared_dir, split_train_val
from sparsedist.data.sources import FASHION_MNIST_SYSTEM_DIR, load_source
from sparsedist.data.synthetic import generate
from tests.distributed import run_gloo

# Loader construction can hang on some FFCV pipeline graphs (NOTES.md): every test that builds one is bounded.
LOADER_TIMEOUT = pytest.mark.timeout(120)


def quiet(message: str) -> None:
    """A log that drops preparation messages."""


def synthetic_config(root: Path, *overrides: str, train_size: int = 320):
    return load_config(None, [
        f"data.root={root}", "data.dataset=synthetic", "data.loader_workers=1", "data.val_fraction=0.2",
        f"data.synthetic.train_size={train_size}", "data.synthetic.test_size=40", "data.synthetic.image_size=8",
        "data.synthetic.num_classes=4", "train.batch_size=32", "eval.batch_size=16", "sparsity.calibration_batches=2",
        "run.seed=7", *overrides,
    ])


def pixels(images: torch.Tensor, spec) -> np.ndarray:
    """Undo the pipeline's normalization: N x H x W x C uint8, as stored."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    restored = torch.round(images * std + mean)
    assert torch.allclose(images * std + mean, restored, atol=1e-3), "normalization must be exactly invertible"
    return restored.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def index_by_pixels(images: np.ndarray) -> dict[bytes, int]:
    table = {image.tobytes(): index for index, image in enumerate(images)}
    assert len(table) == len(images), "source images must be distinct to identify them"
    return table


def source_splits(cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the prepared train/val/test files must contain, straight from the source."""
    source = load_source(cfg.data, quiet)
    train, val = split_train_val(len(source.train_labels), cfg.data.val_fraction, cfg.data.val_seed)
    return {
        "train": (source.train_images[train], source.train_labels[train]),
        "val": (source.train_images[val], source.train_labels[val]),
        "test": (source.test_images, source.test_labels),
    }


def seen_indices(batches, spec, table: dict[bytes, int]) -> list[list[int]]:
    return [[table[image.tobytes()] for image in pixels(images, spec)] for images, _ in batches]


# -------------------------------------------------------------------------------- synthetic set
def test_synthetic_set_is_deterministic_balanced_and_seed_dependent():
    first = generate(64, 4, 8, 3, 0.5, seed=3, stream=0)
    again = generate(64, 4, 8, 3, 0.5, seed=3, stream=0)
    other_seed = generate(64, 4, 8, 3, 0.5, seed=4, stream=0)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other_seed[0])
    assert first[0].shape == (64, 8, 8, 3) and first[0].dtype == np.uint8
    assert np.bincount(first[1]).tolist() == [16] * 4


def test_synthetic_classes_are_not_linearly_separable_from_raw_pixels():
    # Random phases hide the class from any single pixel: a least-squares classifier stays near chance,
    # so the learning test really needs the convolutional model (it reaches high accuracy there).
    train_x, train_y = generate(1024, 4, 16, 3, 0.5, seed=0, stream=0)
    test_x, test_y = generate(512, 4, 16, 3, 0.5, seed=0, stream=1)

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[x.reshape(len(x), -1) / 255.0, np.ones(len(x))]

    weights = np.linalg.lstsq(design(train_x), np.eye(4)[train_y], rcond=None)[0]
    accuracy = ((design(test_x) @ weights).argmax(1) == test_y).mean()
    assert accuracy < 0.4, accuracy


# ----------------------------------------------------------------------------------- preparation
def test_prepare_is_idempotent_and_writes_a_manifest(tmp_path):
    cfg = synthetic_config(tmp_path)
    log = []
    paths = prepare(cfg.data, log.append)
    mtimes = {p: p.stat().st_mtime_ns for p in (paths.train, paths.val, paths.test)}
    assert any("preparing synthetic" in line for line in log)
    assert paths.counts == {"train": 256, "val": 64, "test": 40}

    log.clear()
    assert prepare(cfg.data, log.append) == paths
    assert log == [] and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert find_problem(paths.directory, identity(cfg.data)) is None
    assert sorted(p.name for p in paths.directory.iterdir()) == [".lock", "manifest.json", "test.beton", "train.beton", "val.beton"]


def test_other_split_settings_prepare_a_separate_directory(tmp_path):
    first = prepare(synthetic_config(tmp_path).data, quiet)
    second = prepare(synthetic_config(tmp_path, "data.val_seed=1").data, quiet)
    assert first.directory != second.directory
    assert find_problem(first.directory, identity(synthetic_config(tmp_path).data)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_manifest"])
def test_damaged_files_are_detected_and_rebuilt(tmp_path, damage):
    cfg = synthetic_config(tmp_path)
    paths = prepare(cfg.data, quiet)
    original = paths.train.read_bytes()
    if damage == "truncate":
        paths.train.write_bytes(original[:-1000])
    elif damage == "flip_byte":
        paths.train.write_bytes(original[:5000] + bytes([original[5000] ^ 0xFF]) + original[5001:])
    else:
        (paths.directory / "manifest.json").unlink()
    problem = find_problem(paths.directory, identity(cfg.data))
    assert problem is not None

    log = []
    prepare(cfg.data, log.append)
    assert any(problem in line for line in log), (problem, log)
    assert find_problem(paths.directory, identity(cfg.data)) is None
    assert paths.train.stat().st_size == len(original)


@contextmanager
def contended_lock(lock_path: Path, waiters: int):
    """Hold the prepare lock until `waiters` processes block on it, so they really contend for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        def release_when_contended() -> None:
            deadline = time.monotonic() + 120
            while blocked_on(lock_path) < waiters and time.monotonic() < deadline:
                time.sleep(0.05)
            fcntl.flock(held, fcntl.LOCK_UN)

        releaser = threading.Thread(target=release_when_contended)
        releaser.start()
        try:
            yield
        finally:
            releaser.join()


def blocked_on(lock_path: Path) -> int:
    """Processes waiting for a lock on this file: the `->` lines of /proc/locks naming its inode."""
    inode = f":{lock_path.stat().st_ino} "
    return sum("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


# ---------------------------------------------------------------------------------------- loaders
@LOADER_TIMEOUT
def test_pixels_and_labels_match_the_source_after_undoing_normalization(tmp_path):
    cfg = synthetic_config(tmp_path, "data.loader_workers=2")
    torch_threads = torch.get_num_threads()
    loaders = build_loaders(cfg, log=quiet)
    expected = source_splits(cfg)
    for split, batches in (("val", loaders.val), ("test", loaders.test)):
        images, labels = zip(*[(pixels(x, loaders.spec), y.numpy()) for x, y in batches])
        assert np.array_equal(np.concatenate(images), expected[split][0]), split
        assert np.array_equal(np.concatenate(labels), expected[split][1]), split
    x, y = list(loaders.calibration)[0]
    assert x.dtype == torch.float32 and x.shape == (32, 3, 8, 8) and x.is_contiguous() and y.dtype == torch.int64
    assert torch.get_num_threads() == torch_threads, "FFCV must not change the trainer's torch threads"


@pytest.mark.timeout(120)
def test_importing_the_contract_skips_ffcv_and_importing_ffcv_keeps_torch_threads():
    # A training worker imports the loaders, but torchvision only where an archive is read (a second each).
    code = (
        "import sys, torch; torch.set_num_threads(3); import sparsedist.data.base, sparsedist.data.memory; "
        "print('ffcv' in sys.modules, 'torchvision' in sys.modules); "
        "import sparsedist.launch.worker; from sparsedist.data import build_loaders, prepare; "
        "print('ffcv' in sys.modules, torch.get_num_threads(), 'torchvision' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "True", "3", "False"]


def test_sharded_loaders_without_a_process_group_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="rank 1 of 2 need the matching default process group"):
        build_loaders(synthetic_config(tmp_path), rank=1, world_size=2, log=quiet)


@LOADER_TIMEOUT
def test_training_order_is_seeded_by_epoch_and_capped(tmp_path):
    cfg = synthetic_config(tmp_path, "train.max_steps_per_epoch=3")
    spec = get_spec(cfg.data)
    table = index_by_pixels(source_splits(cfg)["train"][0])
    loaders = build_loaders(cfg, log=quiet)
    assert len(loaders.train) == 3
    epoch0, epoch1 = (seen_indices(loaders.train, spec, table) for _ in range(2))  # iterating advances the epoch
    assert [len(batch) for batch in epoch0] == [32] * 3 and epoch0 != epoch1
    loaders.train.set_epoch(0)
    assert seen_indices(loaders.train, spec, table) == epoch0
    resumed = build_loaders(cfg, epoch=1, log=quiet)  # as a fresh process resuming at epoch 1 would
    assert seen_indices(resumed.train, spec, table) == epoch1
    calibration = [seen_indices(loaders.calibration, spec, table) for _ in range(2)]
    assert calibration[0] == calibration[1] == seen_indices(resumed.calibration, spec, table)
    assert [len(batch) for batch in calibration[0]] == [32, 32]

    threads = threading.active_count()
    next(iter(loaders.train))  # abandoned mid-epoch: the epoch's loader thread must still end
    assert threading.active_count() == threads


@LOADER_TIMEOUT
def test_an_epoch_capped_exactly_the_prefetch_depth_short_of_its_end_still_ends(tmp_path):
    # 8 batches per epoch, capped at 5: FFCV's thread has the last 3 (batches_ahead) queued and then
    # blocks on its end-of-epoch marker; closing the epoch must still let it finish.
    loaders = build_loaders(synthetic_config(tmp_path, "train.max_steps_per_epoch=5"), log=quiet)
    assert loaders.train._loader.batches_ahead == 3 and len(loaders.train._loader) == 8
    threads = threading.active_count()
    for _ in range(2):
        assert sum(1 for _ in loaders.train) == 5
    assert threading.active_count() == threads


def _shards_seen(rank: int, world_size: int, exact_dict: dict, remainder_dict: dict) -> dict:
    from sparsedist.config import validate

    def train_order(loaders, cfg) -> list[list[list[int]]]:
        table = index_by_pixels(source_splits(cfg)["train"][0])
        return [seen_indices(loaders.train, loaders.spec, table) for _ in range(2)]  # epochs 0 and 1

    exact, remainder = validate(exact_dict), validate(remainder_dict)
    log = []  # both ranks prepare at once, as `sparsedist train` workers do
    loaders = build_loaders(exact, rank=rank, world_size=world_size, log=log.append)
    splits = source_splits(exact)
    seen = {split: seen_indices(getattr(loaders, split), loaders.spec, index_by_pixels(splits[split][0])) for split in ("val", "test")}
    resumed = build_loaders(exact, rank=rank, world_size=world_size, epoch=1, log=quiet)
    return {
        "prepare_log": log,
        "len": len(loaders.train),
        "epochs": train_order(loaders, exact),
        "resumed_epoch1": seen_indices(resumed.train, resumed.spec, index_by_pixels(splits["train"][0])),
        "val": sum(seen["val"], []),
        "test": sum(seen["test"], []),
        "calibration": seen_indices(loaders.calibration, loaders.spec, index_by_pixels(splits["train"][0])),
        "remainder_epochs": train_order(build_loaders(remainder, rank=rank, world_size=world_size, log=quiet), remainder),
    }


def assert_disjoint_equal_shards(rank_epochs: list[list[list[list[int]]]], batches: int) -> list[set[int]]:
    """Per epoch: equal batch counts, no index twice across ranks; returns the indices seen per epoch."""
    seen_per_epoch = []
    for epoch in range(2):
        shards = [epochs[epoch] for epochs in rank_epochs]
        assert [len(shard) for shard in shards] == [batches, batches]
        assert all(len(batch) == 16 for shard in shards for batch in shard)
        seen = [index for shard in shards for batch in shard for index in batch]
        assert len(seen) == len(set(seen)) == batches * 32, "no index twice in an epoch"
        seen_per_epoch.append(set(seen))
    assert rank_epochs[0][0] != rank_epochs[0][1], "each epoch has its own order"
    return seen_per_epoch


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_prepare_once_and_together_see_every_training_index_once_per_epoch(tmp_path):
    exact = synthetic_config(tmp_path)  # 256 training examples: a multiple of the global batch 32
    # 255 training examples: odd, and FFCV's sampler would pad 128 per rank, a full last batch with a duplicate.
    # Trimmed to 254: 127 per rank, 7 batches of 16; 30 examples skipped per epoch plus the trimmed one.
    remainder = synthetic_config(tmp_path, train_size=319)
    # Here, where multiprocessing forks: under the ranks' spawn start method FFCV's writer pays an interpreter per file.
    prepare(remainder.data, quiet)
    with contended_lock(prepared_dir(exact.data) / ".lock", waiters=2):
        ranks = run_gloo(_shards_seen, 2, exact.to_dict(), remainder.to_dict(), timeout=200)

    logs = ["\n".join(rank["prepare_log"]) for rank in ranks]
    assert sum(log.count("preparing synthetic") for log in logs) == 1 and all("waiting for another process" in log for log in logs), logs
    assert find_problem(prepared_dir(exact.data), identity(exact.data)) is None

    assert ranks[0]["len"] == ranks[1]["len"] == 8
    seen = assert_disjoint_equal_shards([rank["epochs"] for rank in ranks], batches=8)
    assert seen == [set(range(256))] * 2
    assert [rank["resumed_epoch1"] for rank in ranks] == [rank["epochs"][1] for rank in ranks]
    for split, count in (("val", 64), ("test", 40)):
        assert sorted(ranks[0][split] + ranks[1][split]) == list(range(count)), split
    calibration = [index for rank in ranks for batch in rank["calibration"] for index in batch]
    assert len(calibration) == len(set(calibration)) == 2 * 32

    seen = assert_disjoint_equal_shards([rank["remainder_epochs"] for rank in ranks], batches=7)
    unseen = [set(range(255)) - epoch for epoch in seen]
    assert all(254 in u and len(u) == 31 for u in unseen)  # the trimmed last index, then 30 that rotate
    assert unseen[0] != unseen[1]


@LOADER_TIMEOUT
def test_augmented_training_epochs_replay_exactly(tmp_path):
    plain = build_loaders(synthetic_config(tmp_path, "train.max_steps_per_epoch=2"), log=quiet)
    augmented = build_loaders(synthetic_config(tmp_path, "train.max_steps_per_epoch=2", "data.augment=true"), log=quiet)
    replays = []
    for _ in range(2):
        augmented.train.set_epoch(3)
        replays.append([images for images, _ in augmented.train])
    plain.train.set_epoch(3)
    originals = [images for images, _ in plain.train]
    assert all(torch.equal(a, b) for a, b in zip(*replays))
    assert not any(torch.equal(a, b) for a, b in zip(replays[0], originals))
    assert replays[0][0].shape == originals[0].shape and replays[0][0].is_contiguous()


def test_augmentation_is_a_seeded_crop_and_flip_of_each_image():
    images = torch.randn(6, 3, 8, 8)
    augment = RandomCropFlip(seed=1, rank=0)
    first = augment(images, augment.generator(epoch=2))
    assert torch.equal(first, augment(images, augment.generator(epoch=2)))
    assert not torch.equal(first, augment(images, augment.generator(epoch=3)))
    assert not torch.equal(first, RandomCropFlip(seed=1, rank=1)(images, RandomCropFlip(seed=1, rank=1).generator(epoch=2)))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for index, result in enumerate(first):
        candidates = [padded[index, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(result, c) for c in candidates), index


# ---------------------------------------------------------------------------------------- sources
CIFAR_SIZES = {"data_batch_1": 6, "data_batch_2": 6, "data_batch_3": 6, "data_batch_4": 6, "data_batch_5": 6, "test_batch": 10}


@pytest.fixture
def miniature_cifar10(tmp_path) -> Path:
    """cifar-10-python.tar.gz in the official layout (Python pickles of uint8 rows and label lists), 40 images."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "archive" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, count in CIFAR_SIZES.items():
        batch = {"batch_label": name, "labels": rng.integers(0, 10, count).tolist(),
                 "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "filenames": [f"{name}_{i}.png" for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 6, "num_vis": 3072}, protocol=2))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def torchvision_reads(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's own CIFAR10 reader, told the MD5s of the miniature files instead of the official ones."""
    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    reader = type("MiniatureCIFAR10", (CIFAR10,), {
        "train_list": [[f, md5(f)] for f, _ in CIFAR10.train_list],
        "test_list": [[f, md5(f)] for f, _ in CIFAR10.test_list],
        "meta": {**CIFAR10.meta, "md5": md5("batches.meta")},
    })(str(folder.parent), train=train)
    return reader.data, np.array(reader.targets)


@LOADER_TIMEOUT
def test_cifar10_miniature_archive_matches_torchvision_and_round_trips(tmp_path, miniature_cifar10):
    cfg = load_config(None, [f"data.root={tmp_path / 'root'}", "data.dataset=cifar10", f"data.source={miniature_cifar10}",
                             "data.download=false", "data.loader_workers=1", "data.val_fraction=0.2", "train.batch_size=8", "eval.batch_size=7"])
    source = load_source(cfg.data, quiet)
    reference_train = torchvision_reads(tmp_path / "archive" / "cifar-10-batches-py", train=True)
    reference_test = torchvision_reads(tmp_path / "archive" / "cifar-10-batches-py", train=False)
    assert np.array_equal(source.train_images, reference_train[0]) and np.array_equal(source.train_labels, reference_train[1])
    assert np.array_equal(source.test_images, reference_test[0]) and np.array_equal(source.test_labels, reference_test[1])
    folder_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(tmp_path / "archive")})})
    assert load_source(folder_cfg.data, quiet).checksum() == source.checksum()  # the extracted folder reads the same

    loaders = build_loaders(cfg, log=quiet)
    assert loaders.spec.channels == 3 and loaders.spec.num_classes == 10
    images, labels = zip(*[(pixels(x, loaders.spec), y.numpy()) for x, y in loaders.test])
    assert np.array_equal(np.concatenate(images), reference_test[0]) and np.array_equal(np.concatenate(labels), reference_test[1])


def test_corrupt_files_with_the_source_gone_are_reported_before_training(tmp_path, miniature_cifar10):
    cfg = load_config(None, [f"data.root={tmp_path / 'root'}", "data.dataset=cifar10", f"data.source={miniature_cifar10}",
                             "data.download=false", "data.loader_workers=1"])
    paths = prepare(cfg.data, quiet)
    miniature_cifar10.unlink()
    with open(paths.test, "r+b") as handle:
        handle.truncate(paths.test.stat().st_size // 2)
    with pytest.raises(DataUnavailableError, match=r"(?s)must be rebuilt \(test\.beton has .*truncated.*cifar-10-python\.tar\.gz"):
        build_loaders(cfg, log=quiet)


@pytest.mark.parametrize("dataset, url", [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")])
def test_missing_dataset_error_names_what_to_download_and_where(tmp_path, dataset, url):
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.dataset={dataset}", "data.download=false"])
    with pytest.raises(DataUnavailableError) as caught:
        prepare(cfg.data, quiet)
    message = str(caught.value)
    assert f"https://www.cs.toronto.edu/~kriz/{url}" in message and str(tmp_path / "raw" / dataset / url) in message
    assert "data.download: false" in message and "data.source" in message


def test_a_source_path_that_does_not_exist_is_reported(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}", "data.dataset=fashion-mnist", f"data.source={tmp_path / 'nowhere'}"])
    with pytest.raises(DataUnavailableError, match="does not hold fashion-mnist.*dataset-fashion-mnist"):
        prepare(cfg.data, quiet)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_configured_dataset_has_a_spec_matching_its_shape(dataset):
    spec = get_spec(load_config(None, [f"data.dataset={dataset}"]).data)
    assert spec.name == dataset and len(spec.mean) == len(spec.std) == spec.channels
    assert all(0 < m < 255 and 0 < s < 255 for m, s in zip(spec.mean, spec.std))


def test_unknown_dataset_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.dataset=imagenet"])
    assert all(name in str(caught.value) for name in ("synthetic", "cifar10", "cifar100", "fashion-mnist"))


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason=f"Fashion-MNIST IDX files not installed at {FASHION_MNIST_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)")
@LOADER_TIMEOUT
def test_fashion_mnist_reads_the_debian_package_files(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}", "data.dataset=fashion-mnist", "data.download=false", "data.loader_workers=1", "eval.batch_size=1000"])
    paths = prepare(cfg.data, quiet)
    assert paths.counts == {"train": 54000, "val": 6000, "test": 10000}
    spec = get_spec(cfg.data)
    source = load_source(cfg.data, quiet)
    assert np.bincount(source.test_labels).tolist() == [1000] * 10
    # The registry's statistics are the training images' own.
    assert source.train_images.mean() == pytest.approx(spec.mean[0], abs=0.01)
    assert source.train_images.std() == pytest.approx(spec.std[0], abs=0.01)
    loaders = build_loaders(cfg, log=quiet)
    images, labels = list(loaders.test)[0]
    assert images.shape == (1000, 1, 28, 28)
    assert np.array_equal(pixels(images, spec), source.test_images[:1000]) and np.array_equal(labels.numpy(), source.test_labels[:1000])


# ------------------------------------------------------------------------------- training smoke
def _train_through_ffcv(rank: int, world_size: int, cfg_dict: dict) -> dict:
    from sparsedist.config import validate
    from sparsedist.train.loop import train

    cfg = validate(cfg_dict)
    result = train(cfg, build_loaders(cfg, rank=rank, world_size=world_size, log=quiet), device=torch.device("cpu"))
    return result.final_record


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_training_on_synthetic_data_through_ffcv_learns(tmp_path):
    # The smoke preset: 4 classes of 16x16 gratings (chance 0.25), WRN-10-1, adaptive controller, batch 64.
    # Seeded end to end; with the clipped smoke recipe this run reaches 1.0 train and test accuracy in its third
    # epoch (0.998 train / 1.0 test after two).
    cfg = load_config("smoke", [f"data.root={tmp_path}", "train.epochs=3", "scaling.num_workers=2"])
    prepare(cfg.data, quiet)
    records = run_gloo(_train_through_ffcv, 2, cfg.to_dict(), timeout=280)
    assert records[0]["eval"] == records[1]["eval"], "evaluation is all-reduced: every rank reports the same"
    assert records[0]["train_accuracy"] >= 0.8, records[0]
    assert records[0]["eval"]["test"]["1.00"] >= 0.9, records[0]["eval"]
