"""Both scopes' selections as torch custom ops that read rho and tau from one-element tensors.

torch.compile treats a custom op as one opaque call, so rho and tau changing between steps (every
controller decision, every network-scope step) changes no guard and recompiles nothing; on CUDA the
ops run the Triton kernels, which read rho and tau on the device (no host round trip). With
`use_kernel` False they run the eager reference, reading rho or tau with `.item()` (meant for CPU,
where that costs nothing). Both ways give bitwise-equal results.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity import kernels
from sparsedist.sparsity.layer import kept_per_sample
from sparsedist.sparsity.layer import top_k_mask as eager_top_k_mask
from sparsedist.sparsity.threshold import add_site_counts, bit_histogram, histogram_origin, zero_below


@torch.library.custom_op("sparsedist::top_k_mask", mutates_args=())
def top_k_mask(x: torch.Tensor, keep_ratio: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """Each sample's k = max(1, int(rho * C*H*W)) kept values as a bool mask with x's memory format."""
    if use_kernel:
        return kernels.top_k_mask(x, keep_ratio)
    mask = eager_top_k_mask(x, kept_per_sample(x[0].numel(), keep_ratio.item()))
    return torch.empty_like(x, dtype=torch.bool).copy_(mask)


@top_k_mask.register_fake
def _(x: torch.Tensor, keep_ratio: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool)


@torch.library.custom_op("sparsedist::zero_below_counting", mutates_args=("counts",))
def zero_below_counting(x: torch.Tensor, threshold: torch.Tensor, counts: torch.Tensor, kept_index: int,
                        values_index: int, count: bool, use_kernel: bool) -> torch.Tensor:
    """x where x >= tau else 0; with `count`, adds x's bit-pattern histogram (relative to tau's origin) to
    counts[:HISTOGRAM_BINS], its kept count to counts[kept_index] and its value count to counts[values_index]."""
    if use_kernel:
        return kernels.zero_below_counting(x, threshold, counts, kept_index, values_index, count)
    tau = threshold.item()
    if count:
        add_site_counts(counts, bit_histogram(x, histogram_origin(tau)), kept_index, values_index, x.numel())
    return torch.empty_like(x).copy_(zero_below(x, tau))


@zero_below_counting.register_fake
def _(x, threshold, counts, kept_index, values_index, count, use_kernel) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("sparsedist::zero_below_backward", mutates_args=())
def zero_below_backward(grad: torch.Tensor, x: torch.Tensor, threshold: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """zero_below's gradient: `grad` where x >= tau (exact in float32), everywhere at tau 0, in x's memory
    format whatever grad's (inductor checks the strides against the fake: a channels_last x can meet a
    contiguous gradient)."""
    if use_kernel:
        return kernels.zero_below_backward(grad, x, threshold)
    kept = (x.float() >= threshold) | (threshold <= 0)
    return torch.where(kept, grad, grad.new_zeros(()), out=torch.empty_like(x, dtype=grad.dtype))  # no second pass


@zero_below_backward.register_fake
def _(grad, x, threshold, use_kernel) -> torch.Tensor:
    return torch.empty_like(x, dtype=grad.dtype)


class _ZeroBelowCounting(torch.autograd.Function):
    """zero_below_counting with its gradient (a mutating op cannot take register_autograd)."""

    @staticmethod
    def forward(ctx, x, threshold, counts, kept_index, values_index, count, use_kernel):
        ctx.save_for_backward(x, threshold)  # x is the ReLU output the ReLU saved already: no extra memory
        ctx.use_kernel = use_kernel
        return zero_below_counting(x, threshold, counts, kept_index, values_index, count, use_kernel)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        return zero_below_backward(grad, x, threshold, ctx.use_kernel), None, None, None, None, None, None


def zero_below_and_count(x: torch.Tensor, threshold: torch.Tensor, counts: torch.Tensor, kept_index: int,
                         values_index: int, count: bool, use_kernel: bool) -> torch.Tensor:
    """`zero_below_counting`, with gradients through the kept values when x needs them (and no autograd node when not)."""
    args = (x, threshold, counts, kept_index, values_index, count, use_kernel)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ZeroBelowCounting.apply(*args)
    return zero_below_counting(*args)
