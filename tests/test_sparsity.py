"""Single-process tests of the activation constraint, its statistics and calibration (tiny WRNs, CPU).

Tests may gather site values through forward hooks to compute the exact answers; the product never does.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsedist.bench.sparsity import VARIANTS, reference_top_k_per_sample, run_sparsity_benchmark
from sparsedist.models import WideResNet
from sparsedist.sparsity import ActivationSparsity
from sparsedist.sparsity.layer import top_k_per_sample, top_k_per_sample_traced
from sparsedist.sparsity.threshold import (
    BIN_SHIFT,
    HISTOGRAM_BINS,
    bit_histogram,
    float_to_bits,
    histogram_origin,
    threshold_for_count,
    zero_below,
)
from tests.distributed import free_port


def tiny_model(sparsity: ActivationSparsity, seed: int = 0) -> WideResNet:
    torch.manual_seed(seed)
    return WideResNet(depth=10, widen_factor=1, make_site=sparsity.new_site)


def images(batch: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def site_modules(model: nn.Module, sparsity: ActivationSparsity) -> dict[str, nn.Module]:
    sites = {m.name: m for m in model.modules() if getattr(m, "owner", None) is sparsity}
    assert list(sites) == sparsity.site_names
    return sites


class SiteRecorder:
    """Forward hooks that keep every site's input and output of the forwards run while attached."""

    def __init__(self, model: nn.Module, sparsity: ActivationSparsity):
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in sparsity.site_names}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in sparsity.site_names}
        self.handles = [site.register_forward_hook(self._hook(name)) for name, site in site_modules(model, sparsity).items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name].append(args[0].detach().clone())
            self.outputs[name].append(output.detach().clone())
        return hook

    def realized_keep(self) -> float:
        outputs = [t for values in self.outputs.values() for t in values]
        return sum(int(torch.count_nonzero(t)) for t in outputs) / sum(t.numel() for t in outputs)

    def all_inputs(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for values in self.inputs.values() for t in values])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().mean().backward()


def network_sparsity_after_a_dense_step(keep_ratio: float) -> tuple[ActivationSparsity, WideResNet]:
    """Network scope whose tau for `keep_ratio` comes from one dense training step's statistics."""
    sparsity = ActivationSparsity("network", keep_ratio=1.0)
    model = tiny_model(sparsity)
    train_step(model, images(4, seed=0))
    sparsity.finish_step()
    sparsity.set_keep_ratio(keep_ratio)
    return sparsity, model


# ----------------------------------------------------------------------------- layer scope
@pytest.mark.parametrize("keep_ratio", [0.03, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (3, 5, 7, 2)])
def test_layer_top_k_equals_topk_scatter_reference_in_values_and_gradients(shape, keep_ratio):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator)
    upstream = torch.randn(shape, generator=generator)
    ours_in, reference_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, reference = top_k_per_sample(ours_in, keep_ratio), reference_top_k_per_sample(reference_in, keep_ratio)
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.equal(ours, reference)
    assert torch.equal(ours_in.grad, reference_in.grad)
    k = max(1, int(keep_ratio * x[0].numel()))
    assert torch.equal(torch.count_nonzero(ours.reshape(len(x), -1), dim=1), torch.full((len(x),), k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_layer_top_k_selects_like_the_reference_in_every_float_type(dtype):
    # Distinct small integers (exact in every type), half of them negative, so no ties.
    x = (torch.randperm(3 * 200, generator=torch.Generator().manual_seed(5)) - 300).reshape(3, 2, 10, 10).to(dtype)
    for keep_ratio in (0.05, 0.3, 0.7):
        assert torch.equal(top_k_per_sample(x, keep_ratio), reference_top_k_per_sample(x, keep_ratio))


def test_layer_top_k_with_k_above_the_positive_values_keeps_every_positive():
    # Post-ReLU maps with fewer positives than k: the k-th largest is 0, and which zeros fill the
    # remaining places changes no value: the output is the input, as in the brute-force selection.
    x = torch.relu(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3)))
    ours = top_k_per_sample(x, 0.9)
    assert torch.equal(ours, x)
    assert torch.equal(ours, reference_top_k_per_sample(x, 0.9))


def stable_top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: a stable descending sort puts equal values in index order; keep the first k."""
    flat = x.reshape(len(x), -1).float()
    order = flat.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, order, True).view(x.shape)


@pytest.mark.parametrize("keep_ratio", [0.01, 0.1, 0.4])
def test_layer_top_k_keeps_exactly_k_per_sample_in_bf16_ties_going_to_the_lower_index(keep_ratio):
    # Coarse bf16 values: every value above zero is shared by many positions of a sample.
    x = (torch.relu(torch.randn(3, 16, 9, 7, generator=torch.Generator().manual_seed(4))) * 4).round().bfloat16()
    k = max(1, int(keep_ratio * x[0].numel()))
    expected = torch.where(stable_top_k_mask(x, k), x, 0.0)
    x_in = x.clone().requires_grad_()
    ours = top_k_per_sample(x_in, keep_ratio)
    ours.float().sum().backward()
    assert torch.equal(ours, expected)
    assert torch.equal(torch.count_nonzero(ours.reshape(len(x), -1), dim=1), torch.full((len(x),), k))
    assert torch.equal(x_in.grad, (expected != 0).bfloat16())
    assert torch.equal(top_k_per_sample(x.to(memory_format=torch.channels_last), keep_ratio), expected)
    assert torch.equal(top_k_per_sample_traced(x, torch.tensor(keep_ratio, dtype=torch.float64)), expected)


def test_layer_top_k_at_full_keep_ratio_returns_its_input():
    x = torch.randn(2, 3, 4, 4)
    assert top_k_per_sample(x, 1.0) is x


# --------------------------------------------------------------------------- network scope
def test_network_selection_is_within_half_a_percent_of_kthvalue_on_the_steps_own_values():
    sparsity = ActivationSparsity("network", keep_ratio=1.0)
    model = tiny_model(sparsity)
    for step, keep_ratio in enumerate([0.35, 0.2, 0.05, 0.3, 0.01]):  # below the ~0.5 positive fraction
        recorder = SiteRecorder(model, sparsity)
        train_step(model, images(16, seed=step))
        recorder.remove()
        sparsity.finish_step()
        sparsity.set_keep_ratio(keep_ratio)  # tau chosen from the statistics of the step just run
        values = recorder.all_inputs()
        target = keep_ratio * values.numel()
        kept_by_tau = int((values >= sparsity.threshold).sum())
        assert abs(kept_by_tau - target) <= 0.005 * target, (step, keep_ratio, kept_by_tau, target)
        kth_largest = values.kthvalue(values.numel() - round(target) + 1).values.item()
        assert sparsity.threshold == pytest.approx(kth_largest, rel=0.01)
        assert step == 0 or sparsity.threshold > 0  # later steps run sparse, so the origin is not 0


def test_network_threshold_is_zero_when_rho_exceeds_the_positive_fraction():
    sparsity = ActivationSparsity("network", keep_ratio=0.95)
    model = tiny_model(sparsity)
    train_step(model, images(4, seed=0))
    stats = sparsity.finish_step()
    assert stats.realized_keep < 0.9  # about half of post-ReLU values are zeros
    assert sparsity.threshold == 0.0


def test_network_first_step_is_dense_and_later_steps_follow_the_previous_statistics():
    sparsity = ActivationSparsity("network", keep_ratio=0.2)
    model = tiny_model(sparsity)
    first = sparsity.threshold
    train_step(model, images(8, seed=0))
    assert sparsity.finish_step().threshold == first == 0.0
    train_step(model, images(8, seed=1))
    stats = sparsity.finish_step()
    assert stats.threshold > 0
    assert stats.realized_keep == pytest.approx(0.2, rel=0.1)


def test_a_skipped_network_step_leaves_tau_as_it_was():
    sparsity = ActivationSparsity("network", keep_ratio=0.2)
    model = tiny_model(sparsity)
    train_step(model, images(8, seed=0))
    sparsity.finish_step(skipped=torch.tensor(True))
    assert sparsity.threshold == 0.0
    train_step(model, images(8, seed=0))
    sparsity.finish_step(skipped=torch.tensor(False))
    assert sparsity.threshold > 0


def test_zero_below_keeps_exactly_the_values_at_or_above_tau_and_routes_gradients_to_them():
    x = torch.tensor([0.0, 0.5, 0.9999999, 1.0, 1.0000001, 3.0], requires_grad=True)
    y = zero_below(x, 1.0)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, pytest.approx(1.0000001), 3.0]
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert zero_below(x, 0.0) is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_select_and_count_like_their_float32_values(dtype):
    x = torch.relu(torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1))).to(dtype)
    tau = 0.7231  # not representable in either dtype
    tau = torch.tensor(tau).item()
    assert torch.equal(zero_below(x, tau) != 0, x.float() >= tau)
    origin = histogram_origin(tau)
    assert torch.equal(bit_histogram(x, origin), bit_histogram(x.float(), origin))


def test_negative_zero_counts_as_zero_and_non_finite_values_do_not_break_the_histogram():
    x = torch.tensor([-0.0, 0.0, 2.0, float("nan"), -float("nan"), float("inf")])
    for origin in (1, float_to_bits(1.5)):
        counts = bit_histogram(x, origin)
        assert counts.sum() == x.numel()
    kept_at_tau_zero = bit_histogram(torch.tensor([-0.0, 0.0, 2.0]), histogram_origin(0.0))[: 1 << 15].sum()
    assert kept_at_tau_zero == 1


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_channels_last_models_get_the_same_outputs_and_statistics(scope):
    # The trainer uses channels_last on CUDA; the same code path runs here on CPU.
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        sparsity = ActivationSparsity(scope, keep_ratio=1.0)
        model = tiny_model(sparsity).to(memory_format=memory_format)
        outputs = []
        for step in range(2):
            outputs.append(model(images(4, seed=step).to(memory_format=memory_format)))
            stats = sparsity.finish_step()
            sparsity.set_keep_ratio(0.2)
        results.append((torch.cat(outputs).detach(), stats, sparsity.threshold))
    (contiguous, contiguous_stats, contiguous_tau), (channels_last, channels_last_stats, channels_last_tau) = results
    torch.testing.assert_close(channels_last, contiguous)
    assert channels_last_stats.realized_keep == pytest.approx(contiguous_stats.realized_keep, rel=1e-3)
    assert channels_last_tau == pytest.approx(contiguous_tau, rel=1e-3)


# ------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_site_density_and_realized_keep_match_the_recorded_site_outputs(scope):
    sparsity = ActivationSparsity(scope, keep_ratio=1.0)
    model = tiny_model(sparsity)
    train_step(model, images(6, seed=0))
    sparsity.finish_step()
    sparsity.set_keep_ratio(0.15)
    recorder = SiteRecorder(model, sparsity)
    train_step(model, images(6, seed=1))
    train_step(model, images(3, seed=2))  # two forwards in one step (e.g. accumulation) add up
    recorder.remove()
    stats = sparsity.finish_step()
    nonzero = {name: sum(int(torch.count_nonzero(t)) for t in outs) for name, outs in recorder.outputs.items()}
    values = {name: sum(t.numel() for t in outs) for name, outs in recorder.outputs.items()}
    assert stats.site_density == {name: nonzero[name] / values[name] for name in nonzero}
    assert stats.realized_keep == recorder.realized_keep()
    assert 0.1 < stats.realized_keep < 0.2


def test_eval_forwards_do_not_collect_statistics():
    sparsity = ActivationSparsity("network", keep_ratio=0.5)
    model = tiny_model(sparsity)
    sparsity.collecting = False
    with torch.no_grad():
        model(images(2, seed=0))
    with pytest.raises(RuntimeError, match="no statistics"):
        sparsity.finish_step()


def test_discarded_step_leaves_tau_and_rho_and_starts_fresh_statistics():
    sparsity, model = network_sparsity_after_a_dense_step(0.3)
    tau = sparsity.threshold
    train_step(model, images(4, seed=1))
    sparsity.discard_step()
    assert (sparsity.keep_ratio, sparsity.threshold) == (0.3, tau)
    recorder = SiteRecorder(model, sparsity)
    train_step(model, images(2, seed=2))
    recorder.remove()
    assert sparsity.finish_step().realized_keep == recorder.realized_keep()


def _record_all_reduce_bytes(monkeypatch) -> list[int]:
    reduced: list[int] = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording_all_reduce)
    return reduced


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_statistics_traffic_per_step_is_one_small_all_reduce_independent_of_batch_size(scope, monkeypatch):
    reduced = _record_all_reduce_bytes(monkeypatch)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sparsity = ActivationSparsity(scope, keep_ratio=0.3)
        model = tiny_model(sparsity)
        for batch in (2, 16):
            train_step(model, images(batch, seed=batch))
            sparsity.finish_step()
    finally:
        dist.destroy_process_group()
    assert reduced == [sparsity.statistics_nbytes] * 2
    assert sparsity.statistics_nbytes <= 1 << 20


# ------------------------------------------------------------------------ calibration
def test_calibration_reaches_the_requested_keep_ratio_within_one_percent_in_at_most_eight_passes():
    sparsity = ActivationSparsity("network", keep_ratio=1.0)
    model = tiny_model(sparsity).eval()
    batches = [images(8, seed=10 + i) for i in range(2)]

    def run_forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    sparsity.collecting = False
    for keep_ratio in (0.3, 0.1, 0.03):
        result = sparsity.calibrate(run_forward, keep_ratio, tolerance=0.01, max_iters=8)
        assert result.converged and result.iterations <= 8, result
        assert abs(result.realized_keep / keep_ratio - 1) <= 0.01
        # Independently: the site outputs under that frozen tau realize what calibration reported.
        recorder = SiteRecorder(model, sparsity)
        with sparsity.regime(keep_ratio, threshold=result.threshold):
            run_forward()
        recorder.remove()
        assert recorder.realized_keep() == result.realized_keep
    assert (sparsity.keep_ratio, sparsity.threshold, sparsity.collecting) == (1.0, 0.0, False)


def test_calibration_above_the_positive_fraction_stops_at_tau_zero():
    sparsity = ActivationSparsity("network")
    model = tiny_model(sparsity)

    def run_forward() -> None:
        with torch.no_grad():
            model(images(4, seed=0))

    result = sparsity.calibrate(run_forward, 0.99)
    assert result.threshold == 0.0 and not result.converged and result.iterations == 1


def test_bf16_calibration_ends_at_the_attainable_tau_nearest_the_keep_ratio():
    # A bf16 value is shared by many activations, so only some keep ratios are attainable: the search
    # must move on the bf16 grid and stop at the better of the two taus that bracket rho.
    sparsity = ActivationSparsity("network")
    model = tiny_model(sparsity).bfloat16()
    batch = images(8, seed=1).bfloat16()
    sparsity.collecting = False

    def run_forward() -> None:
        with torch.no_grad():
            model(batch)

    def realized(threshold: float) -> float:
        recorder = SiteRecorder(model, sparsity)
        with sparsity.regime(0.5, threshold=threshold):
            run_forward()
        recorder.remove()
        return recorder.realized_keep()

    for keep_ratio in (0.1, 0.01):
        # A tolerance of 0.2%: finer than one bf16 value's share here, so no tau meets it.
        result = sparsity.calibrate(run_forward, keep_ratio, tolerance=0.002, max_iters=8)
        assert not result.converged and result.iterations <= 5, result
        assert result.threshold == torch.tensor(result.threshold).bfloat16().item()
        assert realized(result.threshold) == result.realized_keep
        tau = torch.tensor(result.threshold, dtype=torch.bfloat16)
        below, above = (realized(torch.nextafter(tau, torch.tensor(limit, dtype=torch.bfloat16)).item())
                        for limit in (0.0, math.inf))
        next_across = above if result.realized_keep > keep_ratio else below  # the next tau towards rho
        assert (result.realized_keep - keep_ratio) * (next_across - keep_ratio) < 0
        error = abs(result.realized_keep / keep_ratio - 1)
        assert abs(below / keep_ratio - 1) >= error and abs(above / keep_ratio - 1) >= error


def test_threshold_search_compares_counts_beyond_float32_precision_exactly():
    # 2**25 values in one bin and a single value in a lower bin: keeping 2**25 + 1 must keep both,
    # which a float32 comparison (2**25 + 1 rounds to 2**25) would miss.
    origin = histogram_origin(0.0)
    high, low = float_to_bits(4.0), float_to_bits(1.0)
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64)
    histogram[((high - origin) >> BIN_SHIFT) % HISTOGRAM_BINS] = 2**25
    histogram[((low - origin) >> BIN_SHIFT) % HISTOGRAM_BINS] = 1
    assert threshold_for_count(histogram, origin, 2**25 + 1) <= 1.0
    assert threshold_for_count(histogram, origin, 2**25) > 1.0


def test_layer_scope_calibration_is_a_no_op():
    result = ActivationSparsity("layer").calibrate(lambda: pytest.fail("must not run"), 0.1)
    assert result.iterations == 0 and result.threshold == 0.0 and math.isnan(result.realized_keep)


# --------------------------------------------------------------------- regime and state
def test_regime_runs_at_another_keep_ratio_and_restores_the_training_state():
    sparsity = ActivationSparsity("layer", keep_ratio=0.5)
    model = tiny_model(sparsity)
    sparsity.collecting = False
    x = images(2, seed=0)
    with torch.no_grad():
        recorder = SiteRecorder(model, sparsity)
        with sparsity.regime(1.0):
            dense = model(x)
        recorder.remove()
        assert all(torch.equal(i, o) for name in recorder.inputs for i, o in zip(recorder.inputs[name], recorder.outputs[name]))
        assert not torch.equal(model(x), dense)
    assert sparsity.keep_ratio == 0.5


def test_network_regime_below_one_needs_a_threshold():
    sparsity = ActivationSparsity("network", keep_ratio=0.5)
    with pytest.raises(ValueError, match="calibrate"):
        with sparsity.regime(0.2):
            pass
    with sparsity.regime(0.2, threshold=0.1):
        assert sparsity.threshold == torch.tensor(0.1).item()
    assert sparsity.threshold == 0.0


def test_state_dict_is_plain_data_that_loads_with_weights_only():
    sparsity, _ = network_sparsity_after_a_dense_step(0.25)
    buffer = io.BytesIO()
    torch.save(sparsity.state_dict(), buffer)
    buffer.seek(0)
    restored = ActivationSparsity("network")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.keep_ratio, restored.threshold) == (0.25, sparsity.threshold) and restored.threshold > 0
    with pytest.raises(ValueError, match="scope"):
        ActivationSparsity("layer").load_state_dict(sparsity.state_dict())


# -------------------------------------------------------------------------- benchmark
def test_sparsity_benchmark_runs_end_to_end_and_reports_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    result = run_sparsity_benchmark(batch_size=2, keep_ratio=0.2, repeats=1, warmup=1, depth=10, widen_factor=1,
                                    image_size=8, threads=1, json_out=str(out))
    assert set(result) == {"setup", "median_step_s", "ratio_to_dense", "images_per_s", "median_cpu_s",
                           "cpu_ratio_to_dense", "targets", "meets_target", "realized_keep"}
    for times in ("median_step_s", "ratio_to_dense", "images_per_s", "median_cpu_s", "cpu_ratio_to_dense"):
        assert set(result[times]) == set(VARIANTS) and all(value > 0 for value in result[times].values())
    assert result["ratio_to_dense"]["dense"] == result["cpu_ratio_to_dense"]["dense"] == 1.0
    assert set(result["realized_keep"]) == {"layer", "network"}
    assert result["setup"]["threads"] == 1
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
