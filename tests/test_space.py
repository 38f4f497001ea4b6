from pathlib import Path

import pytest

from sparsedist.config import apply_overrides, load_config, load_source
from sparsedist.launch.space import (
    MAX_CORNER_COMBINATIONS, SpaceError, check_space, config_paths, load_space, parse_space,
)

SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("tune_spaces").glob("*.yaml"))
METRIC = "eval/val/accuracy/keep_1.00"


def problem_paths(error: SpaceError) -> list[str]:
    return [path for path, _, _ in error.problems]


HELDOUT = ["eval.selection=heldout"]  # a study over a paper preset


@pytest.mark.parametrize("space_file", SPACES, ids=[p.stem for p in SPACES])
@pytest.mark.parametrize("base, overrides", [("smoke", []), ("paper-s2", HELDOUT)], ids=["smoke", "paper-s2"])
def test_shipped_spaces_pass_validation_over_adaptive_presets(space_file, base, overrides):
    configs = check_space(load_space(str(space_file)), apply_overrides(load_source(base), overrides), METRIC)
    assert configs


def test_a_validation_metric_over_a_paper_preset_asks_for_a_heldout_split():
    with pytest.raises(SpaceError) as caught:
        check_space(parse_space({"run.seed": {"grid": [0, 1]}}), load_source("paper-s2"), METRIC)
    assert problem_paths(caught.value) == ["eval.selection"]
    assert "--set eval.selection=heldout" in caught.value.format()


def test_required_spaces_are_shipped():
    assert {"adaptive_compression", "adaptive_reset", "strategies_vs_dense"} <= {p.stem for p in SPACES}


def test_strategy_grid_resolves_preset_controllers_and_replaces_the_section():
    space = load_space(str(SPACES[[p.stem for p in SPACES].index("strategies_vs_dense")]))
    configs = check_space(space, load_source("smoke"), METRIC)
    controllers = {(c.controller.strategy, getattr(c.controller, "interval", None), c.sparsity.scope) for c in configs}
    # dense, Strategy 1 (interval 50, paper-s1) and Strategy 2 (interval 128, paper-s2), in both scopes.
    assert controllers == {(s, i, scope) for s, i in [("dense", None), ("adaptive", 50), ("adaptive", 128)]
                           for scope in ("layer", "network")}
    assert {c.run.seed for c in configs} == {0, 1, 2, 3, 4}


def test_science_space_runs_the_released_controllers_with_intervals_scaled_to_its_base():
    space = load_space(str(SPACES[[p.stem for p in SPACES].index("science")]))
    configs = check_space(space, load_source("science"), METRIC)
    assert len(configs) == 9 and {c.run.seed for c in configs} == {10, 11, 12}
    adaptive = {c.controller.keep_min: c.controller for c in configs if c.controller.strategy == "adaptive"}
    strategy1, strategy2 = adaptive[0.2], adaptive[0.0]
    paper1, paper2 = load_config("paper-s1").controller, load_config("paper-s2").controller
    scaled = {"interval", "interval_epochs"}
    assert strategy1.model_dump(exclude=scaled) == paper1.model_dump(exclude=scaled)
    assert strategy2.model_dump(exclude=scaled) == paper2.model_dump(exclude=scaled)
    # One scaling factor for both: the released intervals are 50 and 128 batches.
    assert strategy1.interval_epochs / strategy2.interval_epochs == pytest.approx(50 / 128, rel=0.05)


def test_unknown_path_is_named_with_a_suggestion():
    with pytest.raises(SpaceError) as caught:
        parse_space({"controller.tighten": {"uniform": [0.01, 0.1]}, "run.seed": {"grid": [0, 1]}})
    assert problem_paths(caught.value) == ["controller.tighten"]
    assert "controller.tighten_pct" in caught.value.format()


@pytest.mark.parametrize("spec, fragment", [
    ({"uniform": [0.2, 0.1]}, "low must be < high"),
    ({"loguniform": [0.0, 0.1]}, "low must be > 0"),
    ({"randint": [0.5, 3]}, "integers"),
    ({"quniform": [0.11, 0.2, 0.1]}, "multiples of q"),
    ({"choice": []}, "non-empty"),
    ({"normal": [0, 1]}, "unknown distribution"),
    ({"uniform": [0.1, 0.2], "choice": [1]}, "expected one distribution"),
    (0.05, "expected one distribution"),
    ({"grid": [{"strategy": "dense"}]}, "labels"),
    ({"grid": {"s1": {"preset": "no-such-preset"}}}, "no such file or preset"),
])
def test_malformed_distribution_is_rejected_before_launch(spec, fragment):
    with pytest.raises(SpaceError) as caught:
        parse_space({"controller.tighten_pct": spec})
    assert fragment in caught.value.format()


@pytest.mark.parametrize("text", ["", "[1, 2]", "a: [unclosed"])
def test_empty_or_unreadable_space_file_is_one_error(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as caught:
        load_space(str(path))
    assert len(caught.value.problems) == 1
    assert caught.value.format().startswith("invalid search space")


def test_missing_space_file_is_one_error(tmp_path):
    with pytest.raises(SpaceError, match="cannot read"):
        load_space(str(tmp_path / "absent.yaml"))


def test_sweep_owned_paths_cannot_be_sampled():
    with pytest.raises(SpaceError) as caught:
        parse_space({"run.run_dir": {"choice": ["/tmp/a", "/tmp/b"]}})
    assert problem_paths(caught.value) == ["run.run_dir"]


def test_corner_value_config_rejects_names_path_and_sample():
    # keep_min above the smoke preset's keep_init (1.0) only at the upper corner of the range.
    space = parse_space({"controller.keep_min": {"uniform": [0.1, 0.9]}, "controller.keep_init": {"choice": [1.0, 0.5]}})
    with pytest.raises(SpaceError) as caught:
        check_space(space, load_source("smoke"), METRIC)
    assert problem_paths(caught.value) == ["controller.keep_min"]
    assert "controller.keep_min=0.9, controller.keep_init=0.5" in caught.value.format()


def test_field_of_another_strategy_is_rejected_over_a_dense_base():
    space = parse_space({"controller.tighten_pct": {"loguniform": [0.005, 0.1]}})
    with pytest.raises(SpaceError) as caught:
        check_space(space, load_source("paper-dense"), METRIC)
    assert problem_paths(caught.value) == ["controller.tighten_pct"]
    assert "unknown field" in caught.value.format()


def test_metric_that_no_trial_reports_is_rejected():
    space = parse_space({"run.seed": {"grid": [0, 1]}})
    with pytest.raises(SpaceError) as caught:
        check_space(space, load_source("smoke"), "eval/val/accuracy/keep_0.10")  # smoke evaluates 1.0, 0.5, 0.2
    assert problem_paths(caught.value) == ["--metric"]
    assert "eval/val/accuracy/keep_0.50" in caught.value.format()


def test_metric_missing_from_some_sampled_grid_is_rejected():
    space = parse_space({"eval.keep_ratios": {"choice": [[1.0, 0.5], [1.0, 0.2]]}, "eval.select_keep_ratio": {"choice": [1.0]}})
    with pytest.raises(SpaceError) as caught:
        check_space(space, load_source("smoke"), "eval/val/accuracy/keep_0.50")
    assert "eval.keep_ratios=[1.0, 0.2]" in caught.value.format()


@pytest.mark.parametrize("spec", [{"randint": [2, 7]}, {"quniform": [0.02, 0.1, 0.02]}])
def test_corners_are_the_extremes_tune_samples(spec):
    dimension = parse_space({"controller.tighten_pct": spec}).dimensions[0]
    samples = dimension.to_tune().sample(size=3000)
    assert [min(samples), max(samples)] == pytest.approx(dimension.corners())


def test_large_space_still_checks_every_corner_value():
    space = parse_space({f"data.synthetic.{name}": {"choice": list(range(1, 9))} for name in ("seed", "train_size", "test_size", "noise")}
                        | {"run.seed": {"grid": list(range(20))}})
    combinations = space.corner_combinations()
    assert len(combinations) < MAX_CORNER_COMBINATIONS
    for dimension in space.dimensions:
        assert {c[dimension.path] for c in combinations} == set(dimension.corners())


def test_config_paths_include_sections_and_every_strategy_field():
    paths = config_paths()
    assert {"controller", "controller.tighten_pct", "controller.rate", "data.synthetic.noise", "run.seed"} <= paths
    assert "controller.nonexistent" not in paths
