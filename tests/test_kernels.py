"""The Triton kernels against the eager reference, bitwise: outputs, gradients, kept sets, histograms, tau.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparsedist.models import WideResNet
from sparsedist.sparsity import ActivationSparsity, kernels, ops
from sparsedist.sparsity.layer import keep_where, kept_per_sample, key_dtype, top_k_mask, top_k_per_sample
from sparsedist.sparsity.threshold import HISTOGRAM_BINS, KEPT_BINS, bit_histogram, histogram_origin, zero_below

DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def site_input(shape: tuple[int, ...], dtype: torch.dtype, layout: torch.memory_format, seed: int) -> torch.Tensor:
    """Post-ReLU-like values with ties (coarse steps), a few negatives, -0.0 and an odd shape."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = torch.where(x > -0.3, torch.relu(x), x) * 4
    x = torch.where(x.abs() < 0.5, x, x.round() / 4).to(dtype)
    x.view(-1)[::7] = -0.0
    return x.to(DEVICE).contiguous(memory_format=layout)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so 0.0 != -0.0), with NaN equal to NaN whatever its payload (eager CPU kernels differ there)."""
    nan = a.isnan()
    return (a.dtype == b.dtype and torch.equal(nan, b.isnan())
            and torch.equal(a.masked_fill(nan, 0).view(key_dtype(a.dtype)), b.masked_fill(nan, 0).view(key_dtype(b.dtype))))


def forward_and_gradient(select, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = select(x)
    (y.float() * torch.arange(y.numel(), device=x.device).view(y.shape)).sum().backward()
    return y.detach(), x.grad


def on_device_top_k(x: torch.Tensor, keep_ratio: float, use_kernel: bool) -> torch.Tensor:
    return keep_where(x, ops.top_k_mask(x, torch.tensor(keep_ratio, dtype=torch.float64, device=x.device), use_kernel))


def on_device_zero_below(x: torch.Tensor, threshold: float, use_kernel: bool, count: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, counts) of the network op for one site, counts laid out as the step's: [histogram | kept | values]."""
    counts = torch.zeros(HISTOGRAM_BINS + 2, dtype=torch.int64, device=x.device)
    y = ops.zero_below_and_count(x, torch.tensor(threshold, device=x.device), counts, HISTOGRAM_BINS,
                                 HISTOGRAM_BINS + 1, count, use_kernel)
    return y, counts


# The second shape spans several kernel blocks per sample (1,615 values > the 1,024 of a block).
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 5, 17, 19)], ids=["one-block", "several-blocks"])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "eager-in-op"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_op_keeps_the_same_k_values_as_the_eager_selection(dtype, layout, use_kernel, shape):
    x = site_input(shape, dtype, layout, seed=0)
    for keep_ratio in (0.01, 0.6, 1.0):
        ours, ours_grad = forward_and_gradient(lambda v: on_device_top_k(v, keep_ratio, use_kernel), x)
        reference, reference_grad = forward_and_gradient(lambda v: top_k_per_sample(v, keep_ratio), x)
        assert same_bits(ours, reference) and same_bits(ours_grad, reference_grad)
        # The next convolution's algorithm, so its rounding, depends on the layout: it must not change.
        assert ours.is_contiguous(memory_format=layout) and reference.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_kernel_split_into_many_programs_per_sample_selects_the_same_values(dtype, layout):
    """Blocks of 32 values: 10 programs per sample add their digit histograms together; ties included."""
    x = site_input((2, 3, 9, 11), dtype, layout, seed=3)
    x[1] = x[1].round()  # a sample made mostly of ties: the index digits decide
    for keep_ratio in (0.05, 0.6):
        mask = kernels.top_k_mask(x, torch.tensor(keep_ratio, dtype=torch.float64, device=x.device), block=32)
        assert torch.equal(mask, top_k_mask(x, kept_per_sample(x[0].numel(), keep_ratio)))
        assert mask.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "eager-in-op"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_network_op_writes_the_eager_output_and_counts_in_one_pass(dtype, layout, use_kernel):
    x = site_input((2, 3, 5, 7), dtype, layout, seed=1)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), 1e-40])  # odd values must bin like the eager path
    for threshold in (0.0, 0.75):
        counts = on_device_zero_below(x, threshold, use_kernel)[1]
        histogram = bit_histogram(x, histogram_origin(threshold))
        assert torch.equal(counts[:HISTOGRAM_BINS], histogram)
        assert counts[HISTOGRAM_BINS:].tolist() == [histogram[:KEPT_BINS].sum().item(), x.numel()]
        assert not on_device_zero_below(x, threshold, use_kernel, count=False)[1].any()
        ours, ours_grad = forward_and_gradient(lambda v: on_device_zero_below(v, threshold, use_kernel)[0], x)
        reference, reference_grad = forward_and_gradient(lambda v: zero_below(v, threshold), x)
        assert same_bits(ours, reference) and same_bits(ours_grad, reference_grad)
        assert ours.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_a_model_trains_bitwise_alike_with_kernels_and_with_the_eager_path(scope, dtype):
    """Two steps (the second in network scope runs with the tau the first chose): outputs, gradients,
    statistics and tau equal."""
    runs = []
    for use_kernels in (True, False):
        sparsity = ActivationSparsity(scope, keep_ratio=1.0 if scope == "network" else 0.1, use_kernels=use_kernels)
        torch.manual_seed(0)
        model = WideResNet(depth=10, widen_factor=1, make_site=sparsity.new_site).to(DEVICE, dtype)
        model = model.to(memory_format=torch.channels_last)
        images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
        record = []
        for step in range(2):
            model.zero_grad()
            logits = model(images)
            logits.float().square().mean().backward()
            stats = sparsity.finish_step()
            sparsity.set_keep_ratio(0.1)
            record += [logits.detach(), [p.grad.clone() for p in model.parameters()], stats.realized_keep,
                       stats.site_density, stats.threshold, sparsity.threshold]
        runs.append(record)
    ours, reference = runs
    for mine, theirs in zip(ours, reference):
        if isinstance(mine, list):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
        elif isinstance(mine, torch.Tensor):
            assert torch.equal(mine, theirs)
        else:
            assert mine == theirs
    assert ours[-1] > 0.0 or scope == "layer"


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsedist.sparsity import kernels

for dtype in ("fp32", "bf16"):
    network = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "counts_ptr": "*i64", "threshold_ptr": "*fp32",
               "numel": "i32", "kept_index": "i32", "values_index": "i32", "IS_BF16": "constexpr", "COUNT": "constexpr",
               "BLOCK": "constexpr"}
    backward = {"grad_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "threshold_ptr": "*fp32",
                "numel": "i32", "BLOCK": "constexpr"}
    shapes = {"values_per_sample": "i32", "chunk": "i32", "channels": "i32", "pixels": "i32", "samples": "i32",
              "IS_BF16": "constexpr", "CHANNELS_LAST": "constexpr", "KEY_PASSES": "constexpr",
              "INDEX_PASSES": "constexpr", "BLOCK": "constexpr"}
    layer_pass = {"x_ptr": f"*{dtype}", "counts_ptr": "*i32", "keep_ratio_ptr": "*fp64", **shapes, "PASS": "constexpr"}
    layer_mask = {"x_ptr": f"*{dtype}", "kept_ptr": "*i8", "counts_ptr": "*i32", "keep_ratio_ptr": "*fp64", **shapes}
    sources = [ASTSource(kernels._network_kernel, network, {"IS_BF16": dtype == "bf16", "COUNT": count, "BLOCK": 1024})
               for count in (False, True)]
    sources += [ASTSource(kernels._network_backward_kernel, backward, {"BLOCK": 1024})]
    key_passes = 2 if dtype == "bf16" else 4
    for channels_last in (False, True):
        constants = {"IS_BF16": dtype == "bf16", "CHANNELS_LAST": channels_last, "KEY_PASSES": key_passes,
                     "INDEX_PASSES": 2, "BLOCK": 1024}
        sources += [ASTSource(kernels._layer_pass_kernel, layer_pass, {**constants, "PASS": digit_pass})
                    for digit_pass in range(key_passes + 2)]
        sources += [ASTSource(kernels._layer_mask_kernel, layer_mask, constants)]
    for source in sources:
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
"""


def test_kernels_compile_for_a_hopper_gpu_without_one():
    # The interpreter runs kernels as Python; the CUDA backend must lower them too (for example, it
    # rejects an early `return` under a constexpr `if` that the interpreter accepts).
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


# Operations that launch nothing on a GPU: allocations and views.
NO_LAUNCH = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::reshape", "aten::as_strided",
             "aten::permute", "aten::_reshape_alias", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::t",
             "aten::expand", "aten::resolve_conj", "aten::resolve_neg", "aten::zeros_like"}


def outermost_operations(model: torch.nn.Module, images: torch.Tensor) -> dict[str, int]:
    """How often each outermost operator ran in one training forward and backward, allocations and views left
    out. (What runs inside our ops is the Triton interpreter's copying here; on a GPU, one kernel launch.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(images).square().mean().backward()
    counted: dict[str, int] = {}
    for event in profile.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "sparsedist::")):
            parent = parent.cpu_parent
        if event.name.startswith(("aten::", "sparsedist::")) and parent is None and event.name not in NO_LAUNCH:
            counted[event.name] = counted.get(event.name, 0) + 1
    return counted


def test_network_scope_adds_one_operation_per_site_each_way():
    """Mask, histogram, kept and value counts are one kernel forward and one backward per site: the
    step runs exactly the operations of the same network without sites, plus those two per site."""
    sparsity = ActivationSparsity("network", keep_ratio=1.0, use_kernels=True)
    torch.manual_seed(0)
    sparse = WideResNet(depth=10, widen_factor=1, make_site=sparsity.new_site)
    torch.manual_seed(0)
    plain = WideResNet(depth=10, widen_factor=1, make_site=lambda name: torch.nn.Identity())
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sparse(images).square().mean().backward()
    sparsity.finish_step()
    sparsity.set_keep_ratio(0.1)  # a tau above 0 from here on
    sparse.zero_grad()  # gradients start as None in both
    assert sparsity.threshold > 0
    with_sites, without = outermost_operations(sparse, images), outermost_operations(plain, images)
    sites = len(sparsity.site_names)
    assert with_sites.pop("sparsedist::zero_below_counting") == sites
    assert with_sites.pop("sparsedist::zero_below_backward") == sites
    assert with_sites == without
