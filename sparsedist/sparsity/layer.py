"""Layer scope (the paper): per sample and per site, keep the k largest values of the C x H x W map."""

from __future__ import annotations

import numpy as np
import torch

# Integer views of the float types: selecting on order-preserving integer keys skips the NaN-aware
# float comparisons and selects the same element. On CPU (WRN-28-4 sites, batch 32, rho 0.1, one
# thread) unsorted torch.topk on keys took 141-189 ms per batch, numpy's partition of them ~15 ms.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}


def kept_per_sample(values_per_sample: int, keep_ratio: float) -> int:
    """k = max(1, int(rho * C * H * W)), the released script's rule."""
    return max(1, int(keep_ratio * values_per_sample))


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type of the order keys of `dtype` values."""
    return _SAME_WIDTH_INT[dtype]


def order_keys(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integers that order like the floats x (sign-magnitude to two's complement), and back: an involution."""
    bits = x if not x.is_floating_point() else x.view(key_dtype(x.dtype))
    magnitude = torch.iinfo(bits.dtype).max
    keys = torch.bitwise_right_shift(bits, bits.element_size() * 8 - 1, out=out)
    return keys.bitwise_and_(magnitude).bitwise_xor_(bits)  # negative floats: flip every magnitude bit


def top_k_per_sample(x: torch.Tensor, keep_ratio: float, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Zero all but each sample's k largest values; gradients flow only through the kept values.

    Exactly k survive per sample (see `top_k_mask`). On inputs without ties the result equals a
    topk + scatter selection exactly. rho = 1 returns x itself. `workspace` (at least x.numel()
    elements of dtype key_dtype(x.dtype), on x.device) holds the selection's integer keys instead of a
    fresh allocation.
    """
    k = kept_per_sample(x[0].numel(), keep_ratio)
    if k >= x[0].numel():
        return x
    kept = top_k_mask(x, k, workspace)
    return _KeepWhereBits.apply(x, kept) if x.is_cpu and x.dtype in _SAME_WIDTH_INT else keep_where(x, kept)


def top_k_mask(x: torch.Tensor, k: int, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's k kept values as a bool mask shaped like x, in x's memory format.

    Each sample's k-th largest value is found (on CPU by `kth_largest_on_cpu`, elsewhere as the
    smallest of an unsorted topk on the order keys), every value above it is kept, and of the values
    tied with it the first ones in (C, H, W) order fill the remaining places (see `top_k_of_keys`;
    skipped when no sample has such ties, the usual float32 case, since it costs a scan). The check
    reads one flag on the host: this is the CPU path (CUDA runs `kernels.top_k_mask`).
    """
    flat = x.detach().reshape(len(x), -1)
    out = None if workspace is None else workspace[: flat.numel()].view(flat.shape)
    if x.is_cpu:
        # A map without negative floats (a ReLU's) orders like its bit patterns already: no keys to
        # compute, and the workspace stays free for the partition.
        bits = flat.view(key_dtype(flat.dtype)) if flat.is_floating_point() else None
        if bits is not None and bool(bits.min() >= 0):
            keys = bits
        else:
            keys, out = order_keys(flat, out), None
        kth_key, tied = kth_largest_on_cpu(keys, k, out)
        kept = None if tied else keys >= kth_key
    else:
        keys = order_keys(flat, out)
        kth_key = keys.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        kept = keys >= kth_key
        tied = bool((kept.sum(dim=1) > k).any())
    if tied:  # values tied with the k-th: only some of them may stay
        kept = top_k_of_keys(keys, kth_key, k)
    # The mask's layout decides the output's: a channels_last map must stay channels_last.
    return kept.view(x.shape).contiguous(memory_format=memory_format(x))


def kth_largest_on_cpu(keys: torch.Tensor, k: int, workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Each row's k-th largest key (as a column) and whether any row holds other keys equal to it.

    numpy's in-place partition (a SIMD quickselect) of the complemented keys puts each row's k
    smallest complements, i.e. its k largest keys, first. Complements, because selecting a high rank
    above the many equal zeros of a ReLU map sends that quickselect into its slow fallback on some
    rows (100x), and selecting a low rank does not. `workspace` (keys' shape and dtype) holds them.
    """
    complements = torch.bitwise_not(keys, out=workspace).numpy()
    complements.partition(k - 1, axis=1)
    kth = complements[:, k - 1 : k]
    # The rest of each row is >= its k-th smallest: equal to it somewhere means a tie.
    tied = bool((complements[:, k:].min(axis=1, initial=np.iinfo(kth.dtype).max) == kth[:, 0]).any())
    return torch.bitwise_not(torch.from_numpy(kth)), tied


class _KeepWhereBits(torch.autograd.Function):
    """`keep_where` on CPU, bitwise the same both ways: multiplying the bit patterns by the mask
    keeps a value's bits or gives +0.0, as where() does, but vectorizes (where() ran 4-8x slower)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kept)
        return (x.view(key_dtype(x.dtype)) * kept).view(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _KeepWhereBits.apply(grad, ctx.saved_tensors[0]), None  # itself: twice differentiable, as where()


def memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def top_k_of_keys(keys: torch.Tensor, kth_key: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Mask of the k largest keys of each row, ties broken by the lower (C, H, W) index.

    `keys` are order keys as (samples, C*H*W) in logical order, `kth_key` each row's k-th largest
    key as a column. bf16 maps hold many equal values; keeping all of them would keep more than k
    (+3% at rho 0.01 on relu(randn) maps), and an index order makes the choice the same on every
    replica and memory format.
    """
    above = keys > kth_key
    tied = keys == kth_key
    ties_kept = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= ties_kept))


def keep_where(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    # where() saves only the bool mask for backward and routes the gradient to kept values alone.
    return torch.where(kept, x, 0.0)


def top_k_per_sample_traced(x: torch.Tensor, keep_ratio: torch.Tensor) -> torch.Tensor:
    """`top_k_per_sample` with rho a tensor, for graphs that serve every rho (torch.export).

    k = max(1, int(rho * C*H*W)) stays a tensor: the keys are sorted in full and the k-th largest is
    gathered with a tensor index, so no shape in the graph depends on rho. The same k-th largest key
    is selected, so the result is bitwise that of `top_k_per_sample` (rho as float64, as Python's).
    """
    values_per_sample = x[0].numel()
    keys = order_keys(x.detach().reshape(x.shape[0], values_per_sample))
    k = (keep_ratio.to(torch.float64) * values_per_sample).floor().clamp(1, values_per_sample).to(torch.int64)
    kth_key = keys.sort(dim=1, descending=True).values.index_select(1, (k - 1).reshape(1))
    return keep_where(x, top_k_of_keys(keys, kth_key, k).view(x.shape))
