"""Keep-ratio controllers driven by scripted accuracy sequences.

Every expected trajectory is worked out by hand in the comments beside it. Most scenarios use binary
fractions (0.5, 0.125, ...) so the arithmetic is exact and rho can be compared with ==.
"""

from __future__ import annotations

import json

import pytest

from sparsedist.config import (
    AdaptiveControllerConfig,
    CyclicControllerConfig,
    DenseControllerConfig,
    FixedControllerConfig,
    load_config,
    preset_names,
)
from sparsedist.controllers import (
    COOLDOWN,
    EVENTS,
    HOLD,
    RELAX,
    RESET,
    TIGHTEN,
    WARMUP,
    build_controller,
    resolve_interval,
)


def trajectory(controller, accuracies):
    return [(d.keep_ratio, d.event) for d in map(controller.step, accuracies)]


def exact_adaptive(**fields):
    """An adaptive config whose arithmetic stays in binary fractions; one decision per batch."""
    base = dict(
        keep_init=0.5, keep_min=0.125, keep_max=1.0, tighten_pct=0.5, relax_step=0.0625, max_relax_jump=0.25,
        relax_gain=1.0, ema_beta=0.5, drop_tol=0.125, cooldown=0, interval=1,
    )  # fmt: skip
    return AdaptiveControllerConfig(**{**base, **fields})


def test_dense_keeps_everything_and_always_holds():
    controller = build_controller(DenseControllerConfig(), steps_per_epoch=10)
    assert controller.keep_ratio == 1.0
    assert trajectory(controller, [0.1, 0.9, 0.0, 1.0]) == [(1.0, HOLD)] * 4


def test_fixed_is_dense_during_warmup_then_constant():
    # warmup_epochs 0.5 of 4 batches = 2 warm-up batches; after the 2nd, the next batch uses rho = 0.25.
    controller = build_controller(FixedControllerConfig(keep_ratio=0.25, warmup_epochs=0.5), steps_per_epoch=4)
    assert controller.keep_ratio == 1.0
    assert trajectory(controller, [0.5] * 4) == [(1.0, WARMUP), (0.25, WARMUP), (0.25, HOLD), (0.25, HOLD)]


def test_cyclic_compresses_every_interval_and_resets_under_floor():
    controller = build_controller(CyclicControllerConfig(keep_init=1.0, rate=0.5, floor=0.2, interval=2), 100)
    # 1 -> 0.5 -> 0.25 on batches 2 and 4; on batch 6, 0.125 < 0.2 so back to keep_init.
    assert trajectory(controller, [0.5] * 8) == [
        (1.0, HOLD), (0.5, TIGHTEN), (0.5, HOLD), (0.25, TIGHTEN),
        (0.25, HOLD), (1.0, RESET), (1.0, HOLD), (0.5, TIGHTEN),
    ]  # fmt: skip


def test_cyclic_reset_returns_to_keep_init_not_dense():
    controller = build_controller(CyclicControllerConfig(keep_init=0.8, rate=0.5, floor=0.3, interval=1), 100)
    # 0.8 -> 0.4; 0.2 < 0.3 -> 0.8.
    assert trajectory(controller, [0.5] * 3) == [(0.4, TIGHTEN), (0.8, RESET), (0.4, TIGHTEN)]


def test_interval_epochs_overrides_interval():
    # interval_epochs 0.5 of 4 batches = every 2 batches, although interval says 50.
    cfg = CyclicControllerConfig(keep_init=1.0, rate=0.5, floor=0.2, interval=50, interval_epochs=0.5)
    assert trajectory(build_controller(cfg, steps_per_epoch=4), [0.5] * 4) == [
        (1.0, HOLD), (0.5, TIGHTEN), (0.5, HOLD), (0.25, TIGHTEN),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "interval_epochs, steps_per_epoch, batches",
    [(None, 391, 50), (0.1, 391, 39), (2.0, 391, 782), (0.001, 100, 1)],  # the last one rounds to 0: at least 1
)
def test_interval_epochs_resolves_to_whole_batches(interval_epochs, steps_per_epoch, batches):
    assert resolve_interval(exact_adaptive(interval=50, interval_epochs=interval_epochs), steps_per_epoch) == batches


def test_strategy2_relax_is_a_full_reset_to_dense_then_three_cooldown_decisions():
    cfg = load_config("paper-s2", ["controller.interval=2"]).controller
    controller = build_controller(cfg, steps_per_epoch=100)
    once, twice = 1 - 0.018, (1 - 0.018) * (1 - 0.018)
    accuracies = [1, 1, 1, 1, 0.5, 0.5] + [1] * 8
    # EMA (beta 0.5) is 1 for four batches; then 0.75, 0.625: drop 0.375 > 0.12, so
    # delta = min(1 * min(1 + 1.5 * 0.255 / 0.12, 5), 1) = 1 and rho returns to 1.
    # Then EMA 0.8125, 0.90625 (drop 0.094 <= 0.12): cooldown 3 decisions, then tighten again.
    assert trajectory(controller, accuracies) == [
        (1.0, HOLD), (once, TIGHTEN), (once, HOLD), (twice, TIGHTEN), (twice, HOLD), (1.0, RESET),
        (1.0, HOLD), (1.0, COOLDOWN), (1.0, HOLD), (1.0, COOLDOWN), (1.0, HOLD), (1.0, COOLDOWN),
        (1.0, HOLD), (once, TIGHTEN),
    ]  # fmt: skip


def test_strategy1_preset_relaxes_on_a_one_point_drop_by_at_most_one_relax_step():
    controller = build_controller(load_config("paper-s1", ["controller.interval=1"]).controller, 100)
    # EMA (beta 0.9): 1, 0.999 (drop 0.001 <= drop_tol 0.01: tighten), 0.9891 (drop 0.0109: relax). The
    # growth factor 1 + 1.5 * 0.0009 / 0.01 = 1.135 would give 0.03405, but max_relax_jump caps it at 0.03.
    assert trajectory(controller, [1.0, 0.99, 0.9]) == [
        (0.98, TIGHTEN), (0.98 * 0.98, TIGHTEN), (0.98 * 0.98 + 0.03, RELAX),
    ]  # fmt: skip


def test_gradual_relax_grows_with_drop_until_max_relax_jump_and_stops_at_keep_max():
    controller = build_controller(exact_adaptive(), steps_per_epoch=100)
    # batch  acc   EMA       drop      growth 1 + (drop - 0.125)/0.125   delta = min(0.0625 * growth, 0.25)
    #   1    1     1         0         -                                  tighten 0.5 -> 0.25
    #   2    0.5   0.75      0.25      2                                  0.125     -> 0.375
    #   3    0.5   0.625     0.375     3                                  0.1875    -> 0.5625
    #   4    0.25  0.4375    0.5625    4.5                                0.28125 capped 0.25 -> 0.8125
    #   5    1     0.71875   0.28125   2.25                               0.140625  -> 0.953125
    #   6    1     0.859375  0.140625  1.125                              0.0703125 -> 1.0234375, capped 1
    assert trajectory(controller, [1, 0.5, 0.5, 0.25, 1, 1]) == [
        (0.25, TIGHTEN), (0.375, RELAX), (0.5625, RELAX), (0.8125, RELAX), (0.953125, RELAX), (1.0, RESET),
    ]  # fmt: skip


@pytest.mark.parametrize("max_relax_jump", [1.0, 0.0])  # 0: no cap, as in the released script
def test_relax_growth_is_capped_at_five_relax_steps(max_relax_jump):
    controller = build_controller(exact_adaptive(keep_init=0.25, keep_min=0.25, max_relax_jump=max_relax_jump), 100)
    # 1: EMA 1, tighten would give 0.125 but keep_min holds 0.25.
    # 2: EMA 0.5, drop 0.5, growth 4 -> +0.25 = 0.5.
    # 3: EMA 0.25, drop 0.75, growth 6 capped at 5 -> +0.3125 = 0.8125 (uncapped: 0.875).
    assert trajectory(controller, [1, 0, 0]) == [(0.25, TIGHTEN), (0.5, RELAX), (0.8125, RELAX)]


def test_best_ema_is_the_running_maximum_and_survives_a_relax():
    controller = build_controller(exact_adaptive(keep_init=1.0), 100)
    # EMA 0.5, 0.75, 0.875 (each a new best: tighten 0.5, 0.25, 0.125); then 0.6875: drop 0.1875 from the
    # best 0.875 (from the first EMA it would be none), growth 1.5 -> +0.09375 = 0.21875; then 0.59375: drop
    # 0.28125 from the same best (a best reset at the relax would leave 0.09375), growth 2.25 -> +0.140625.
    assert trajectory(controller, [0.5, 1, 1, 0.5, 0.5]) == [
        (0.5, TIGHTEN), (0.25, TIGHTEN), (0.125, TIGHTEN), (0.21875, RELAX), (0.359375, RELAX),
    ]  # fmt: skip


def test_tightening_stops_at_keep_min():
    controller = build_controller(exact_adaptive(keep_init=1.0, keep_min=0.3), 100)
    assert trajectory(controller, [0.5] * 4) == [(0.5, TIGHTEN), (0.3, TIGHTEN), (0.3, TIGHTEN), (0.3, TIGHTEN)]


def test_cooldown_counts_decisions_and_a_relax_restarts_it():
    controller = build_controller(exact_adaptive(cooldown=2), 100)
    # EMA: 1 (tighten), 0.75 (drop 0.25: relax +0.125, cooldown 2), 0.875 (drop 0.125, not > tol: cooldown 1 left),
    # 0.75 (drop 0.25: relax again +0.125, cooldown back to 2), 0.875, 0.9375 (two cooldowns), 0.96875 (tighten).
    assert trajectory(controller, [1, 0.5, 1, 0.625, 1, 1, 1]) == [
        (0.25, TIGHTEN), (0.375, RELAX), (0.375, COOLDOWN), (0.5, RELAX), (0.5, COOLDOWN), (0.5, COOLDOWN),
        (0.25, TIGHTEN),
    ]  # fmt: skip


def test_warmup_is_dense_unobserved_and_decisions_count_from_its_end():
    # warmup_epochs 1.5 of 2 batches = 3 warm-up batches. Had their accuracy 1.0 been observed, the best EMA
    # would be 1 and the 0.5 accuracies afterwards would relax; had the interval counted warm-up batches,
    # batch 4 would decide.
    controller = build_controller(exact_adaptive(warmup_epochs=1.5, interval=2), steps_per_epoch=2)
    assert controller.keep_ratio == 1.0
    assert trajectory(controller, [1, 1, 1, 0.5, 0.5, 0.5, 0.5]) == [
        (1.0, WARMUP), (1.0, WARMUP), (0.5, WARMUP), (0.5, HOLD), (0.25, TIGHTEN), (0.25, HOLD), (0.125, TIGHTEN),
    ]  # fmt: skip


RESUME_CASES = {
    "adaptive-cooldown": (
        exact_adaptive(cooldown=2, warmup_epochs=1.0, interval=2),
        [1, 1, 1, 0.5, 1, 0.625, 1, 1, 1, 0.25, 0.5, 1],
    ),
    "cyclic": (CyclicControllerConfig(rate=0.5, floor=0.2, interval=2, warmup_epochs=0.5), [0.5] * 12),
    "fixed": (FixedControllerConfig(keep_ratio=0.3, warmup_epochs=1.0), [0.5] * 6),
}  # fmt: skip


@pytest.mark.parametrize("name", RESUME_CASES)
def test_restored_controller_continues_the_identical_trajectory(name):
    cfg, accuracies = RESUME_CASES[name]
    expected = trajectory(build_controller(cfg, steps_per_epoch=2), accuracies)
    for cut in range(len(accuracies) + 1):
        original = build_controller(cfg, steps_per_epoch=2)
        head = trajectory(original, accuracies[:cut])
        state = json.loads(json.dumps(original.state_dict()))  # plain numbers and strings only
        assert state == original.state_dict()
        restored = build_controller(cfg, steps_per_epoch=2)
        restored.load_state_dict(state)
        assert restored.keep_ratio == original.keep_ratio
        assert head + trajectory(restored, accuracies[cut:]) == expected, f"resumed after batch {cut}"


def test_state_of_another_strategy_is_refused():
    state = build_controller(DenseControllerConfig(), 10).state_dict()
    with pytest.raises(ValueError, match="dense"):
        build_controller(exact_adaptive(), 10).load_state_dict(state)


@pytest.mark.parametrize("accuracy", [float("nan"), -0.1, 1.5])
def test_accuracy_outside_unit_interval_is_rejected(accuracy):
    with pytest.raises(ValueError, match="global_accuracy"):
        build_controller(exact_adaptive(), 10).step(accuracy)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_builds_a_working_controller(preset):
    cfg = load_config(preset).controller
    controller = build_controller(cfg, steps_per_epoch=20)
    for decision in map(controller.step, [0.9, 0.2] * 100):
        assert 0.0 < decision.keep_ratio <= 1.0
        assert decision.event in EVENTS
    assert controller.state_dict()["strategy"] == cfg.strategy
