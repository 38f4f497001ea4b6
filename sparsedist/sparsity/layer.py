"""Layer scope (the paper): per sample and per site, keep the k largest values of the C x H x W map."""

from __future__ import annotations

import torch


def kept_per_sample(values_per_sample: int, keep_ratio: float) -> int:
    """k = max(1, int(rho * C * H * W)), the released script's rule."""
    return max(1, int(keep_ratio * values_per_sample))


def top_k_per_sample(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Zero all but each sample's k largest values; gradients flow only through the kept values.

    The k-th largest value of each sample is found with kthvalue and every value >= it is kept, so
    values tied with the k-th one are all kept (more than k survive). On continuous inputs ties do
    not occur and the result equals a topk + scatter selection exactly; on post-ReLU maps the common
    tie is at 0 when k exceeds the positive values, where keeping the zeros changes nothing.
    rho = 1 returns x itself.
    """
    values_per_sample = x[0].numel()
    k = kept_per_sample(values_per_sample, keep_ratio)
    if k >= values_per_sample:
        return x
    flat = x.detach().reshape(len(x), values_per_sample)
    kth_largest = flat.kthvalue(values_per_sample - k + 1, dim=1).values
    kept = x >= kth_largest.view(-1, *([1] * (x.dim() - 1)))
    # where() saves only the bool mask for backward and routes the gradient to kept values alone.
    return torch.where(kept, x, 0.0)
