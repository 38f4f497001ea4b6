"""Triton kernels for both scopes: the same selections as the eager code, bitwise, in fewer passes.

`network`: one pass per site writes the masked output and adds the site's bit-pattern histogram.
The zeros (about half of all post-ReLU values) are counted per block and added once per block, so
the zero bin sees one atomic add per block instead of one per value; nonzero values spread over
thousands of bins.

`layer`: one program per sample finds the k-th largest order key by a radix search (8-bit digits
from the top, `tl.histogram` over the values still matching the prefix found so far), then, when
more values tie with it than places remain, the cut-off (C, H, W) index among the tied ones by the
same search over index digits, and writes output and mask in one last pass. No sort; every pass
reads the sample in memory order (contiguous or channels_last), so the loads coalesce.

The eager code (`layer.top_k_per_sample`, `threshold.bit_histogram` + `zero_below`) is the
reference and the path on CPU; with TRITON_INTERPRET=1 these kernels also run on CPU tensors, which
is how the test suite checks them without a GPU. Supported: float32 and bfloat16 inputs, 4-D maps
(contiguous or channels_last) for `layer`.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity.layer import kept_per_sample
from sparsedist.sparsity.threshold import BIN_SHIFT, HISTOGRAM_BINS, largest_below

try:
    import triton
    import triton.language as tl
except ImportError:  # the method works without Triton: the eager code serves every device
    triton = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_BLOCK = 1024  # values per block: 4 KiB of float32 per load
_DIGIT_BITS = 8


def supports(x: torch.Tensor, scope: str) -> bool:
    """Whether the kernel of `scope` takes x: float32/bf16, and for `layer` a contiguous or channels_last 4-D map."""
    if triton is None or x.dtype not in KERNEL_DTYPES:
        return False
    if scope == "network":
        return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))


if triton is not None:

    @triton.jit
    def _float32_bits(x, IS_BF16: tl.constexpr):
        """The float32 bit patterns (int32) of loaded values; bf16 widens exactly by a shift."""
        if IS_BF16:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:
            bits = x.to(tl.int32, bitcast=True)
        return bits

    @triton.jit(do_not_specialize=["origin", "zero_bin"])
    def _network_kernel(x_ptr, y_ptr, histogram_ptr, numel, below, origin, zero_bin,
                        IS_BF16: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        x = tl.load(x_ptr + offsets, mask=in_range, other=0)
        magnitude = _float32_bits(x, IS_BF16) & 0x7FFFFFFF  # -0.0 counts as zero
        nonzero = in_range & (magnitude != 0)
        bins = ((magnitude - origin) >> 16) & 0xFFFF
        tl.atomic_add(histogram_ptr + bins, 1, mask=nonzero, sem="relaxed")
        zeros = tl.sum((in_range & (magnitude == 0)).to(tl.int32), axis=0)
        tl.atomic_add(histogram_ptr + zero_bin, zeros, sem="relaxed")
        if WRITE:
            # As F.threshold: x <= below -> 0, so NaN passes through like in the eager path.
            tl.store(y_ptr + offsets, tl.where(x <= below, 0.0, x).to(x.dtype), mask=in_range)

    @triton.jit
    def _order_keys(x, IS_BF16: tl.constexpr):
        """uint32 keys that order like the floats: negative values flip every bit, the others the sign bit.

        bf16 keys keep only their top 16 bits, so that equal bf16 values have equal keys."""
        bits = _float32_bits(x, IS_BF16)
        keys = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
        if IS_BF16:
            keys = keys & 0xFFFF0000
        return keys

    @triton.jit
    def _load_keys(row_ptr, start, values_per_sample, channels, pixels, IS_BF16: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
        """One block of a sample in memory order: values, their keys, (C, H, W) indices and the in-row mask."""
        positions = start + tl.arange(0, BLOCK)
        in_row = positions < values_per_sample
        x = tl.load(row_ptr + positions, mask=in_row, other=0)
        if CHANNELS_LAST:
            index = (positions % channels) * pixels + positions // channels
        else:
            index = positions
        return x, _order_keys(x, IS_BF16), index, in_row

    @triton.jit(do_not_specialize=["k"])
    def _layer_kernel(x_ptr, y_ptr, kept_ptr, values_per_sample, channels, pixels, k,
                      IS_BF16: tl.constexpr, CHANNELS_LAST: tl.constexpr, KEY_PASSES: tl.constexpr,
                      INDEX_PASSES: tl.constexpr, BLOCK: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * values_per_sample
        digits = tl.arange(0, 256)
        # ---- the k-th largest key, digit by digit from the top; `remaining` counts places left at the prefix
        prefix = tl.zeros([], dtype=tl.uint32)
        remaining = k
        ties = 0
        for p in tl.static_range(KEY_PASSES):
            shift = 24 - 8 * p
            counts = tl.zeros([256], dtype=tl.int32)
            for start in range(0, values_per_sample, BLOCK):
                x, keys, index, in_row = _load_keys(x_ptr + base, start, values_per_sample, channels, pixels,
                                                    IS_BF16, CHANNELS_LAST, BLOCK)
                if p == 0:
                    matching = in_row
                else:
                    matching = in_row & ((keys >> (shift + 8)) == (prefix >> (shift + 8)))
                counts += tl.histogram(((keys >> shift) & 0xFF).to(tl.int32), 256, mask=matching)
            at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
            digit = tl.max(tl.where(at_or_above >= remaining, digits, -1), axis=0)
            ties = tl.sum(tl.where(digits == digit, counts, 0), axis=0)
            remaining -= tl.sum(tl.where(digits == digit, at_or_above, 0), axis=0) - ties
            prefix |= digit.to(tl.uint32) << shift
        # ---- more ties than places: the `remaining`-th smallest (C, H, W) index among the tied values
        cutoff = values_per_sample
        if remaining < ties:
            index_prefix = 0
            for p in tl.static_range(INDEX_PASSES):
                shift = 8 * (INDEX_PASSES - 1 - p)
                counts = tl.zeros([256], dtype=tl.int32)
                for start in range(0, values_per_sample, BLOCK):
                    x, keys, index, in_row = _load_keys(x_ptr + base, start, values_per_sample, channels, pixels,
                                                        IS_BF16, CHANNELS_LAST, BLOCK)
                    matching = in_row & (keys == prefix) & ((index >> (shift + 8)) == (index_prefix >> (shift + 8)))
                    counts += tl.histogram((index >> shift) & 0xFF, 256, mask=matching)
                below_or_at = tl.cumsum(counts, axis=0)
                digit = tl.min(tl.where(below_or_at >= remaining, digits, 256), axis=0)
                remaining -= tl.sum(tl.where(digits == digit, below_or_at - counts, 0), axis=0)
                index_prefix |= digit << shift
            cutoff = index_prefix
        # ---- output and the mask autograd needs
        for start in range(0, values_per_sample, BLOCK):
            x, keys, index, in_row = _load_keys(x_ptr + base, start, values_per_sample, channels, pixels,
                                                IS_BF16, CHANNELS_LAST, BLOCK)
            kept = (keys > prefix) | ((keys == prefix) & (index <= cutoff))
            tl.store(y_ptr + base + start + tl.arange(0, BLOCK), tl.where(kept, x, 0.0).to(x.dtype), mask=in_row)
            tl.store(kept_ptr + base + start + tl.arange(0, BLOCK), kept.to(tl.int8), mask=in_row)


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """x's storage in memory order (a view): contiguous and channels_last maps are both dense."""
    if x.is_contiguous():
        return x.reshape(-1)
    return x.permute(0, 2, 3, 1).reshape(-1)


def _launch_network(x: torch.Tensor, threshold: float, origin: int, write: bool) -> tuple[torch.Tensor, torch.Tensor]:
    flat = _memory_order(x.detach())
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.int32, device=x.device)
    y = torch.empty_like(x) if write else x
    below = largest_below(threshold, x.dtype) if write else 0.0
    grid = (triton.cdiv(flat.numel(), _BLOCK),)
    _network_kernel[grid](flat, _memory_order(y) if write else flat, histogram, flat.numel(), below, origin,
                          (-origin >> BIN_SHIFT) % HISTOGRAM_BINS, IS_BF16=x.dtype == torch.bfloat16,
                          WRITE=write, BLOCK=_BLOCK)
    return y, histogram


class _ZeroBelow(torch.autograd.Function):
    """Forward: the fused kernel (output and histogram); backward: F.threshold's own (gradient where x > below)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: float, origin: int) -> tuple[torch.Tensor, torch.Tensor]:
        y, histogram = _launch_network(x, threshold, origin, write=True)
        ctx.mark_non_differentiable(histogram)
        ctx.save_for_backward(x)  # the ReLU output the ReLU saved already: no extra memory
        ctx.below = largest_below(threshold, x.dtype)
        return y, histogram

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _histogram_grad: None):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, x, ctx.below), None, None


def zero_below_with_histogram(x: torch.Tensor, threshold: float, origin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`zero_below(x, threshold)`, `bit_histogram(x, origin)` as int32) in one pass over x."""
    if threshold <= 0.0:
        return x, _launch_network(x, threshold, origin, write=False)[1]
    return _ZeroBelow.apply(x, threshold, origin)


class _TopKPerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        samples, channels, height, width = x.shape
        values_per_sample = channels * height * width
        y = torch.empty_like(x)
        kept = torch.empty_like(x, dtype=torch.int8)
        _layer_kernel[(samples,)](
            _memory_order(x.detach()), _memory_order(y), _memory_order(kept), values_per_sample, channels,
            height * width, k, IS_BF16=x.dtype == torch.bfloat16,
            CHANNELS_LAST=not x.is_contiguous(), KEY_PASSES=2 if x.dtype == torch.bfloat16 else 4,
            INDEX_PASSES=max(1, -(-(values_per_sample - 1).bit_length() // _DIGIT_BITS)), BLOCK=_BLOCK,
        )
        ctx.save_for_backward(kept.view(torch.bool))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return torch.where(kept, grad, 0.0), None


def top_k_per_sample(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """`layer.top_k_per_sample`, bitwise: exactly k kept per sample, ties to the lower (C, H, W) index."""
    k = kept_per_sample(x[0].numel(), keep_ratio)
    return x if k >= x[0].numel() else _TopKPerSample.apply(x, k)
