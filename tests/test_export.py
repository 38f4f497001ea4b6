"""Export, load and the torch.export program, on real checkpoints of short real runs (FFCV synthetic data).

One run per scope is trained in this process by the real loop on the real FFCV loaders, its checkpoint
saved by the real checkpoint code, exported by the `sparsedist export` command; accuracies are
compared with what `sparsedist eval` reports for the same checkpoint.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsedist.cli import main
from sparsedist.config import regime_key
from sparsedist.data.registry import get_spec
from sparsedist.data.sources import load_source
from sparsedist.export.artifact import ArtifactError
from sparsedist.export.load import load_model
from sparsedist.train.checkpoint import STATE_FILE, load_checkpoint
from tests.export_helpers import KEEP_RATIOS, train_run

SCOPES = ("layer", "network")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{scope: (run directory, export directory)}, exported with --program."""
    root = str(tmp_path_factory.mktemp("export"))
    result = {}
    for scope in SCOPES:
        run_dir = train_run(root, scope)
        out = os.path.join(root, f"model-{scope}")
        assert main(["export", run_dir, "--out", out, "--program"]) == 0
        result[scope] = (run_dir, out)
    return result


def stored_config(run_dir):
    from sparsedist.config import Config

    return Config.model_validate_json(load_checkpoint(os.path.join(run_dir, "best"))["config"])


def raw_test_batches(cfg):
    """The test split as uint8 N x C x H x W batches, in the order and sizes `sparsedist eval` uses."""
    source = load_source(cfg.data, log=lambda line: None)
    images = torch.from_numpy(source.test_images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(source.test_labels)
    return list(zip(images.split(cfg.eval.batch_size), labels.split(cfg.eval.batch_size)))


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def test_export_writes_weights_config_and_model_card(exported):
    run_dir, out = exported["network"]
    cfg = stored_config(run_dir)
    spec = get_spec(cfg.data)
    config = read_json(os.path.join(out, "config.json"))
    weights = load_file(os.path.join(out, "model.safetensors"))
    state = load_checkpoint(os.path.join(run_dir, "best"))["model"]
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[name], state[name]) for name in state)
    assert config["format_version"] == 1
    assert config["model"] == cfg.model.model_dump(mode="json")
    assert (config["input"]["mean"], config["input"]["std"]) == (list(spec.mean), list(spec.std))
    assert (config["input"]["channels"], config["input"]["image_size"], config["num_classes"]) == (3, 16, 4)
    assert config["sparsity"]["scope"] == "network"
    assert [regime["keep_ratio"] for regime in config["regimes"]] == KEEP_RATIOS
    below_dense = config["regimes"][1:]
    assert all(regime["threshold"] >= 0 and 0 < regime["realized_keep"] <= 1 for regime in below_dense)
    assert config["regimes"][-1]["threshold"] > config["regimes"][-2]["threshold"] > 0  # fewer kept: higher tau
    assert config["provenance"]["config"] == cfg.to_dict()
    assert config["provenance"]["versions"]["torch"] == torch.__version__
    card = open(os.path.join(out, "README.md")).read()
    assert "sparsedist.load_model" in card and "| 0.05 |" in card


@pytest.mark.parametrize("scope", SCOPES)
def test_loaded_model_accuracy_equals_sparsedist_eval_at_every_regime(exported, scope, tmp_path):
    run_dir, out = exported[scope]
    eval_json = str(tmp_path / "eval.json")
    assert main(["eval", run_dir, "--json", eval_json]) == 0
    reported = read_json(eval_json)["accuracy"]["test"]
    stored = {regime_key(r["keep_ratio"]): r["accuracy"]["test"] for r in read_json(os.path.join(out, "config.json"))["regimes"]}
    model = load_model(out)
    batches = raw_test_batches(stored_config(run_dir))
    for keep_ratio in KEEP_RATIOS:
        model.set_keep_ratio(keep_ratio)
        with torch.no_grad():
            correct = sum((model(images).argmax(dim=1) == labels).sum().item() for images, labels in batches)
        accuracy = correct / sum(len(labels) for _, labels in batches)
        assert accuracy == reported[regime_key(keep_ratio)] == stored[regime_key(keep_ratio)], keep_ratio


@pytest.mark.parametrize("scope", SCOPES)
def test_program_equals_the_eager_model_at_every_regime(exported, scope):
    run_dir, out = exported[scope]
    program = torch.export.load(os.path.join(out, "model.pt2")).module()
    model = load_model(out)
    images = raw_test_batches(stored_config(run_dir))[0][0][:37]  # a batch size the export never saw
    for keep_ratio in KEEP_RATIOS:
        model.set_keep_ratio(keep_ratio)
        with torch.no_grad():
            eager = model(images)
            served = program(images.float(), torch.tensor(keep_ratio, dtype=torch.float64))
        torch.testing.assert_close(served, eager, rtol=1e-6, atol=1e-6 * eager.abs().max().item())
        assert torch.equal(served.argmax(dim=1), eager.argmax(dim=1))
    # rho is an input, not a constant: the sparse regimes differ from dense.
    dense = program(images.float(), torch.tensor(1.0, dtype=torch.float64))
    assert not torch.equal(dense, program(images.float(), torch.tensor(0.05, dtype=torch.float64)))


def test_uint8_and_float_pixels_give_the_same_logits(exported):
    model = load_model(exported["layer"][1], keep_ratio=0.2)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(images), model(images.float()))


def test_network_scope_refuses_an_untrained_ratio_unless_given_calibration_images(exported):
    run_dir, out = exported["network"]
    model = load_model(out)
    with pytest.raises(ArtifactError, match=r"0.3 is not a trained regime.*trained: 1.0, 0.5, 0.2, 0.05") as caught:
        model.set_keep_ratio(0.3)
    assert caught.value.field == "keep_ratio"
    source = load_source(stored_config(run_dir).data, log=lambda line: None)
    calibration = torch.from_numpy(source.train_images[:128]).permute(0, 3, 1, 2)
    model.set_keep_ratio(0.3, calibration=calibration)
    assert model.keep_ratio == 0.3
    assert model.thresholds[0.2] > model.thresholds[0.3] > 0  # between the trained regimes around it


def test_layer_scope_runs_any_ratio(exported):
    model = load_model(exported["layer"][1], keep_ratio=0.3)
    assert model.keep_ratio == 0.3


@pytest.mark.parametrize("keep_ratio", [0.0, -0.1, 1.5])
def test_ratio_outside_zero_one_is_refused_naming_the_field(exported, keep_ratio, tmp_path, capsys):
    with pytest.raises(ArtifactError) as caught:
        load_model(exported["layer"][1], keep_ratio=keep_ratio)
    assert caught.value.field == "keep_ratio"
    out = tmp_path / "refused"
    assert main(["export", exported["layer"][0], "--out", str(out), "--keep-ratios", f"1,{keep_ratio}"]) == 2
    assert "keep_ratio: must be in (0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_format_version_is_refused(exported, tmp_path):
    copy = shutil.copytree(exported["layer"][1], tmp_path / "copy")
    config = read_json(copy / "config.json")
    config["format_version"] = 99
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="format_version 99") as caught:
        load_model(copy)
    assert caught.value.field == "format_version"


def test_weights_that_do_not_match_the_architecture_are_refused(exported, tmp_path):
    copy = shutil.copytree(exported["layer"][1], tmp_path / "copy")
    weights = load_file(copy / "model.safetensors")
    weights["head.weight"] = weights["head.weight"][:3]
    del weights["stem.weight"]
    save_file(weights, copy / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"missing stem.weight; head.weight has shape \(3, 64\), the architecture needs \(4, 64\)") as caught:
        load_model(copy)
    assert caught.value.field == "model.safetensors"


def test_existing_output_is_kept_unless_overwrite(exported, capsys):
    run_dir, out = exported["layer"]
    before = open(os.path.join(out, "config.json")).read()
    assert main(["export", run_dir, "--out", out]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert open(os.path.join(out, "config.json")).read() == before
    assert os.path.isfile(os.path.join(out, "model.pt2"))


def test_overwrite_replaces_the_export(exported, tmp_path):
    run_dir, out = exported["layer"]
    target = shutil.copytree(out, tmp_path / "target")
    assert main(["export", run_dir, "--out", str(target), "--overwrite", "--keep-ratios", "1,0.1"]) == 0
    config = read_json(target / "config.json")
    assert [regime["keep_ratio"] for regime in config["regimes"]] == [1.0, 0.1]
    assert config["files"]["program"] is None and not (target / "model.pt2").exists()
    assert sorted(os.listdir(tmp_path)) == ["target"]  # no staging or retired directory left behind


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_missing_or_damaged_checkpoint_is_a_clear_error_and_writes_nothing(exported, damage, tmp_path, capsys):
    run_dir = shutil.copytree(exported["layer"][0], tmp_path / "run")
    if damage == "missing":
        shutil.rmtree(run_dir / "best")
    else:
        with open(run_dir / "best" / STATE_FILE, "r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00" * 16)
    out = tmp_path / "exports" / "model"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("damaged" in err if damage == "corrupted" else "neither a checkpoint" in err)
    assert not out.parent.exists() or os.listdir(out.parent) == []
