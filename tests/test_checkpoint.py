import os

import pytest
import torch

from sparsedist.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


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
    with pytest.raises(Exception, match="[Ww]eights.only"):
        load_checkpoint(path)
