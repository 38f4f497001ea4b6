import hashlib
import json
import os
import pickle
import threading

import pytest
import torch

from sparsedist.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, newer_of, save_checkpoint


def sample_state():
    return {"model": {"w": torch.arange(6.0)}, "epoch": 3, "rng": {"torch": torch.get_rng_state()}, "config": "{}"}


def test_round_trip_with_weights_only_load(tmp_path):
    path = save_checkpoint(sample_state(), tmp_path / "epoch_00003")
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(6.0))
    assert latest_checkpoint(str(tmp_path)) == path


def test_resaving_the_same_name_replaces_it_and_leaves_no_temporaries(tmp_path):
    save_checkpoint(sample_state(), tmp_path / "epoch_00001")
    state = sample_state() | {"epoch": 9}
    save_checkpoint(state, tmp_path / "epoch_00001")
    assert load_checkpoint(tmp_path / "epoch_00001")["epoch"] == 9
    assert os.listdir(tmp_path) == ["epoch_00001"]


def test_damaged_or_incomplete_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(sample_state(), tmp_path / "epoch_00001")
    with open(os.path.join(path, "state.pt"), "r+b") as handle:
        handle.seek(40)
        handle.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    os.remove(os.path.join(path, "COMPLETE"))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path)
    assert latest_checkpoint(str(tmp_path)) is None


class Opaque:
    pass


def test_arbitrary_objects_are_rejected_by_the_weights_only_load(tmp_path):
    path = save_checkpoint({"bad": Opaque()}, tmp_path / "epoch_00001")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)


def test_a_planted_pickle_payload_with_a_matching_checksum_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(sample_state(), tmp_path / "best")
    payload = pickle.dumps(Opaque())  # what a hand-made file would hold: arbitrary objects, not tensors
    with open(os.path.join(path, "state.pt"), "wb") as handle:
        handle.write(payload)
    with open(os.path.join(path, "COMPLETE"), "w") as handle:
        json.dump({"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, handle)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)


def test_replacing_a_checkpoint_never_leaves_its_name_empty(tmp_path):
    # A reader polls the name while it is replaced again and again: it must always find a complete copy.
    target = tmp_path / "best"
    save_checkpoint(sample_state(), target)
    misses, stop = [], threading.Event()

    def read_continuously():
        while not stop.is_set():
            if not (target / "COMPLETE").is_file():  # seen directly: load_checkpoint retries would hide a gap
                misses.append("no complete checkpoint at the name")
            try:
                load_checkpoint(target)
            except CheckpointError as error:
                misses.append(str(error))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for epoch in range(200):
            save_checkpoint(sample_state() | {"epoch": epoch}, target)
    finally:
        stop.set()
        reader.join()
    assert misses == []
    assert load_checkpoint(target)["epoch"] == 199


def test_a_crashed_save_leaves_staging_that_the_next_save_removes(tmp_path):
    save_checkpoint(sample_state(), tmp_path / "best")
    os.makedirs(tmp_path / ".best.crashed1" / "half")  # what a save killed mid-write leaves
    os.makedirs(tmp_path / ".best.old.crashed2")
    save_checkpoint(sample_state(), tmp_path / "best")
    assert os.listdir(tmp_path) == ["best"]


def test_a_restart_takes_a_newer_complete_checkpoint_than_the_registered_one_but_never_a_damaged_one(tmp_path):
    registered = save_checkpoint(sample_state() | {"epoch": 1}, tmp_path / "epoch_00001")
    assert newer_of(None, str(tmp_path))["epoch"] == 1  # nothing registered yet: the run directory's newest
    assert newer_of(load_checkpoint(registered), str(tmp_path))["epoch"] == 1
    newer = save_checkpoint(sample_state() | {"epoch": 2}, tmp_path / "epoch_00002")  # uploaded, not registered
    assert newer_of(load_checkpoint(registered), str(tmp_path))["epoch"] == 2
    assert newer_of(sample_state() | {"epoch": 4}, str(tmp_path))["epoch"] == 4  # registered is the newest
    with open(os.path.join(newer, "state.pt"), "r+b") as handle:  # an upload cut short
        handle.truncate(10)
    assert newer_of(load_checkpoint(registered), str(tmp_path))["epoch"] == 1
    assert newer_of(None, str(tmp_path))["epoch"] == 1  # the newest that verifies, not a fresh start
    assert newer_of(None, str(tmp_path / "missing")) is None
