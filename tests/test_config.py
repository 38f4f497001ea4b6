import subprocess
import sys

import pytest
import yaml

from sparsedist.config import Config, ConfigError, load_config, preset_names, validate


def test_every_preset_validates_and_paper_presets_match_the_released_script():
    assert set(preset_names()) >= {"paper-dense", "paper-s1", "paper-s2", "network-s1", "network-s2", "demo", "smoke"}
    for name in preset_names():
        load_config(name)
    s2 = load_config("paper-s2")
    assert (s2.data.dataset, s2.model.depth, s2.model.widen_factor, s2.sparsity.scope) == ("cifar10", 28, 4, "layer")
    assert (s2.controller.tighten_pct, s2.controller.relax_step, s2.controller.max_relax_jump) == (0.018, 1.0, 1.0)
    assert (s2.controller.ema_beta, s2.controller.interval, s2.controller.keep_min) == (0.5, 128, 0.0)
    assert (s2.train.epochs, s2.train.batch_size, s2.run.seed, s2.optim.weight_decay) == (500, 128, 3407, 0.0)
    s1 = load_config("paper-s1")
    assert (s1.controller.keep_min, s1.controller.relax_step, s1.controller.ema_beta, s1.controller.interval) == (0.2, 0.03, 0.9, 50)
    assert load_config("network-s1").sparsity.scope == "network"


def test_every_field_is_documented():
    def walk(model_cls, prefix=""):
        for name, info in model_cls.model_fields.items():
            assert info.description, f"{prefix}{name} has no description"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, Config.__mro__[1]):
                walk(annotation, f"{prefix}{name}.")

    walk(Config)
    from sparsedist import config as module

    for cls in (module.DenseControllerConfig, module.FixedControllerConfig, module.CyclicControllerConfig,
                module.AdaptiveControllerConfig):
        walk(cls, "controller.")


def test_overrides_are_yaml_scalars_and_strategy_switch_drops_old_fields():
    cfg = load_config("paper-s1", ["train.epochs=3", "eval.keep_ratios=[1.0, 0.1]", "controller.keep_ratio=0.25",
                                   "controller.strategy=fixed", "data.augment=true"])
    assert cfg.train.epochs == 3 and cfg.eval.keep_ratios == [1.0, 0.1] and cfg.data.augment is True
    assert cfg.controller.strategy == "fixed" and cfg.controller.keep_ratio == 0.25


def test_invalid_config_lists_every_error_with_dotted_path():
    with pytest.raises(ConfigError) as caught:
        load_config("smoke", ["controller.keep_min=2", "eval.keep_ratios=[1.0, 0]", "model.depth=11",
                              "bogus.key=1", "data.dataset=imagenet", "optim.momentum=-1"])
    paths = {path for path, _, _ in caught.value.problems}
    assert paths == {"controller.keep_min", "eval.keep_ratios", "model.depth", "bogus", "data.dataset", "optim.momentum"}
    assert "fashion-mnist" in caught.value.format()  # unknown dataset lists the known ones


@pytest.mark.parametrize("overrides, path", [
    ({"controller": {"strategy": "adaptive", "keep_min": 0.5, "keep_init": 0.4}}, "controller.keep_min"),
    ({"controller": {"strategy": "adaptive", "keep_init": 1.0, "keep_max": 0.8}}, "controller.keep_init"),
    ({"controller": {"strategy": "adaptive", "tighten_pct": 1.0}}, "controller.tighten_pct"),
    ({"eval": {"keep_ratios": [1.0, 0.5], "select_keep_ratio": 0.3}}, "eval.select_keep_ratio"),
    ({"train": {"batch_size": 63}, "scaling": {"num_workers": 2}}, "train.batch_size"),
    ({"optim": {"momentum": 0.0, "nesterov": True}}, "optim.nesterov"),
    ({"train": {"compile_mode": "reduce-overhead"}}, "train.compile_mode"),
])
def test_cross_field_rules_point_at_the_offending_field(overrides, path):
    with pytest.raises(ConfigError) as caught:
        validate(overrides)
    assert [p for p, _, _ in caught.value.problems] == [path]


def test_cli_validate_exit_codes_and_output(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"epochs": 7}, "controller": {"strategy": "fixed", "keep_ratio": 0.3}}))
    ok = subprocess.run([sys.executable, "-m", "sparsedist.cli", "config", "validate", "--config", str(config_file),
                         "--set", "train.batch_size=64"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert resolved["train"]["epochs"] == 7 and resolved["train"]["batch_size"] == 64
    assert validate(resolved).controller.keep_ratio == 0.3  # the printed YAML round-trips
    bad = subprocess.run([sys.executable, "-m", "sparsedist.cli", "config", "validate", "--config", str(config_file),
                          "--set", "controller.keep_ratio=0", "--set", "train.epochs=zero"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "controller.keep_ratio" in bad.stderr and "train.epochs" in bad.stderr and "'zero'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "sparsedist.cli", "config", "validate", "--config", "no-such-preset"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "paper-s1" in missing.stderr


def test_the_configuration_reference_is_current():
    from pathlib import Path

    from sparsedist.config import reference_markdown

    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page, "regenerate docs/configuration.md's table with `sparsedist config reference`"


def test_loader_threads_follow_the_worker_allotment_unless_set():
    assert load_config("paper-s2", ["scaling.cpus_per_worker=6"]).data.loader_workers == 6
    assert load_config("paper-s2", ["scaling.cpus_per_worker=0.5"]).data.loader_workers == 1
    assert load_config("paper-s2", ["scaling.cpus_per_worker=6", "data.loader_workers=2"]).data.loader_workers == 2


def test_configs_lay_over_one_another_in_order_then_the_sets():
    cfg = load_config(["paper-s2", "gpu-4"], ["train.epochs=50"])
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.train.epochs) == (4, True, 50)
    assert cfg.controller.interval == 128 and cfg.train.precision == "fp16"  # the rest is paper-s2's


def test_an_overlay_merges_a_section_and_replaces_a_controller_of_another_strategy(tmp_path):
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump({"controller": {"strategy": "adaptive", "drop_tol": 0.05}}))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"controller": {"strategy": "fixed", "keep_ratio": 0.3}}))
    merged = load_config(["paper-s2", str(same)]).controller
    assert merged.drop_tol == 0.05 and merged.interval == 128 and merged.keep_min == 0.0
    assert load_config(["paper-s2", str(other)]).controller.keep_ratio == 0.3  # no adaptive field left behind


def test_version_from_the_command_and_python_m():
    for command in (["-m", "sparsedist", "--version"], ["-m", "sparsedist.cli", "--version"]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("sparsedist "), done
