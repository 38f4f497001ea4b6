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
from sparsedist.sparsity.threshold import HISTOGRAM_BINS, bit_histogram, histogram_origin, zero_below


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


@torch.library.custom_op("sparsedist::zero_below_with_histogram", mutates_args=())
def zero_below_with_histogram(x: torch.Tensor, threshold: torch.Tensor, use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x where x >= tau else 0, x's bit-pattern histogram relative to tau's origin as int32)."""
    if use_kernel:
        return kernels.zero_below_with_histogram(x, threshold)
    tau = threshold.item()
    histogram = bit_histogram(x, histogram_origin(tau)).to(torch.int32)
    return torch.empty_like(x).copy_(zero_below(x, tau)), histogram


@zero_below_with_histogram.register_fake
def _(x: torch.Tensor, threshold: torch.Tensor, use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(HISTOGRAM_BINS, dtype=torch.int32)


def _save_input_and_threshold(ctx, inputs, output) -> None:
    x, threshold, _ = inputs
    ctx.save_for_backward(x, threshold)  # x is the ReLU output the ReLU saved already: no extra memory


def _gradient_through_kept(ctx, grad: torch.Tensor, _histogram_grad: torch.Tensor | None):
    x, threshold = ctx.saved_tensors
    # zero_below's gradient: where x >= tau (exact in float32), everywhere at tau 0.
    kept = (x.float() >= threshold) | (threshold <= 0)
    return torch.where(kept, grad, 0.0), None, None


zero_below_with_histogram.register_autograd(_gradient_through_kept, setup_context=_save_input_and_threshold)
