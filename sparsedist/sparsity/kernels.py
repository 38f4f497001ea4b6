"""Triton kernels for both scopes: the same selections as the eager code, bitwise, in fewer passes.

rho and tau are read on the device (one-element tensors), so a new rho or tau needs neither a host
round trip nor a recompilation. `ops` wraps these launchers as custom ops with autograd.

`network`: one pass per site writes the masked output and adds the site's bit-pattern histogram,
kept count and value count to the step's counts (one launch; a second one in backward). The zeros
(about half of all post-ReLU values) are counted per block and added once per block, so the zero
bin sees one atomic add per block instead of one per value; nonzero values spread over thousands of
bins.

`layer`: the k-th largest order key of each sample by a radix search (8-bit digits from the top,
`tl.histogram` over the values still matching the prefix found so far), then, when more values tie
with it than places remain, the cut-off (C, H, W) index among the tied ones by the same search over
index digits, then the mask. Each sample is split into chunks, one program each, so that a batch of
128 fills a 132-SM GPU several times over; a launch per digit lets a sample's programs add their
histograms together, and every program replays the digits chosen so far from those histograms. No
sort; every pass reads the sample in memory order (contiguous or channels_last), so loads coalesce.

The eager code (`layer.top_k_mask`, `threshold.bit_histogram` + `zero_below`) is the reference and
the path on CPU; with TRITON_INTERPRET=1 these kernels also run on CPU tensors, which is how the
test suite checks them without a GPU. Supported: float32 and bfloat16 inputs, contiguous or
channels_last, 4-D maps for `layer`.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from sparsedist.sparsity.threshold import KEPT_BINS

try:
    import triton
    import triton.language as tl
except ImportError:  # the method works without Triton: the eager code serves every device
    triton = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_BLOCK = 1024  # values per block: 4 KiB of float32 per load
_DIGIT_BITS = 8
# Layer scope splits each sample so that a batch gives every multiprocessor at least this many programs.
PROGRAMS_PER_SM = 4
INTERPRETER_MULTIPROCESSORS = 8  # CPU tensors (Triton's interpreter): enough to split the tests' small samples


def supports(x: torch.Tensor, scope: str) -> bool:
    """Whether the kernel of `scope` takes x: float32/bf16, and for `layer` a contiguous or channels_last 4-D map."""
    if triton is None or x.dtype not in KERNEL_DTYPES:
        return False
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return dense and (scope == "network" or x.dim() == 4)


if triton is not None:
    _KEPT_BINS = tl.constexpr(KEPT_BINS)  # kernels read only constexpr globals

    @triton.jit
    def _float32_bits(x, IS_BF16: tl.constexpr):
        """The float32 bit patterns (int32) of loaded values; bf16 widens exactly by a shift."""
        if IS_BF16:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) << 16
        else:
            bits = x.to(tl.int32, bitcast=True)
        return bits

    @triton.jit
    def _network_kernel(x_ptr, y_ptr, counts_ptr, threshold_ptr, numel, kept_index, values_index,
                        IS_BF16: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
        threshold = tl.load(threshold_ptr)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        x = tl.load(x_ptr + offsets, mask=in_range, other=0)
        if COUNT:  # into the step's int64 counts: histogram, then this site's kept and value counts
            origin = tl.maximum(threshold.to(tl.int32, bitcast=True), 1)  # as threshold.histogram_origin
            magnitude = _float32_bits(x, IS_BF16) & 0x7FFFFFFF  # -0.0 counts as zero
            bins = ((magnitude - origin) >> 16) & 0xFFFF
            tl.atomic_add(counts_ptr + bins, 1, mask=in_range & (magnitude != 0), sem="relaxed")
            zeros = tl.sum((in_range & (magnitude == 0)).to(tl.int64), axis=0)
            tl.atomic_add(counts_ptr + (((0 - origin) >> 16) & 0xFFFF), zeros, sem="relaxed")
            # Kept values are those stored in the bins below KEPT_BINS (the zeros never are).
            kept = tl.sum((in_range & (bins < _KEPT_BINS)).to(tl.int64), axis=0)
            tl.atomic_add(counts_ptr + kept_index, kept, sem="relaxed")
            tl.atomic_add(counts_ptr + values_index, numel.to(tl.int64), mask=tl.program_id(0) == 0, sem="relaxed")
        # As zero_below: keep x >= tau (compared exactly in float32), everything at tau 0; NaN passes.
        lowest_kept = tl.where(threshold > 0, threshold, float("-inf"))
        tl.store(y_ptr + offsets, tl.where(x.to(tl.float32) < lowest_kept, 0.0, x).to(x.dtype), mask=in_range)

    @triton.jit
    def _network_backward_kernel(grad_ptr, x_ptr, out_ptr, threshold_ptr, numel, BLOCK: tl.constexpr):
        threshold = tl.load(threshold_ptr)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < numel
        x = tl.load(x_ptr + offsets, mask=in_range, other=0)
        grad = tl.load(grad_ptr + offsets, mask=in_range, other=0)
        # As zero_below's gradient: through x >= tau (exact in float32), everywhere at tau 0.
        through_kept = tl.where(x.to(tl.float32) >= threshold, grad, 0.0)
        tl.store(out_ptr + offsets, tl.where(threshold > 0, through_kept, grad).to(grad.dtype), mask=in_range)

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
        """One block of a sample in memory order: order keys, (C, H, W) indices and the in-row mask."""
        positions = start + tl.arange(0, BLOCK)
        in_row = positions < values_per_sample
        x = tl.load(row_ptr + positions, mask=in_row, other=0)
        if CHANNELS_LAST:
            index = (positions % channels) * pixels + positions // channels
        else:
            index = positions
        return _order_keys(x, IS_BF16), index, in_row

    @triton.jit
    def _kept_count(keep_ratio_ptr, values_per_sample):
        """k = max(1, int(rho * C*H*W)) in float64, as layer.kept_per_sample computes it."""
        k = (tl.load(keep_ratio_ptr) * values_per_sample).to(tl.int32)
        return tl.minimum(tl.maximum(k, 1), values_per_sample)

    @triton.jit
    def _key_digits(counts_ptr, sample, samples, k, PASSES: tl.constexpr):
        """(prefix, remaining, ties) after the first PASSES key digits, replayed from their histograms:
        the prefix of the k-th largest key, the places left at it, and how many values match it."""
        digits = tl.arange(0, 256)
        prefix = tl.zeros([], dtype=tl.uint32)
        remaining = k
        ties = 0
        for p in tl.static_range(PASSES):
            counts = tl.load(counts_ptr + (p * samples + sample).to(tl.int64) * 256 + digits)
            at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
            digit = tl.max(tl.where(at_or_above >= remaining, digits, -1), axis=0)
            ties = tl.sum(tl.where(digits == digit, counts, 0), axis=0)
            remaining -= tl.sum(tl.where(digits == digit, at_or_above, 0), axis=0) - ties
            prefix |= digit.to(tl.uint32) << (24 - 8 * p)
        return prefix, remaining, ties

    @triton.jit
    def _index_digits(counts_ptr, sample, samples, remaining, PASSES: tl.constexpr, INDEX_PASSES: tl.constexpr):
        """(index prefix, remaining) after the first PASSES index digits (histograms stored after the key ones):
        the `remaining`-th smallest (C, H, W) index among the tied values."""
        digits = tl.arange(0, 256)
        index_prefix = 0
        for p in tl.static_range(PASSES):
            counts = tl.load(counts_ptr + (p * samples + sample).to(tl.int64) * 256 + digits)
            below_or_at = tl.cumsum(counts, axis=0)
            digit = tl.min(tl.where(below_or_at >= remaining, digits, 256), axis=0)
            remaining -= tl.sum(tl.where(digits == digit, below_or_at - counts, 0), axis=0)
            index_prefix |= digit << (8 * (INDEX_PASSES - 1 - p))
        return index_prefix, remaining

    @triton.jit
    def _layer_pass_kernel(x_ptr, counts_ptr, keep_ratio_ptr, values_per_sample, chunk, channels, pixels, samples,
                           IS_BF16: tl.constexpr, CHANNELS_LAST: tl.constexpr, KEY_PASSES: tl.constexpr,
                           INDEX_PASSES: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr):
        """One digit of the search: this chunk's histogram of the next digit among the values still matching,
        added to the sample's. Passes below KEY_PASSES are key digits, the others index digits (tied values)."""
        sample = tl.program_id(0)
        first = tl.program_id(1) * chunk
        last = tl.minimum(first + chunk, values_per_sample)
        row_ptr = x_ptr + sample.to(tl.int64) * values_per_sample
        k = _kept_count(keep_ratio_ptr, values_per_sample)
        counts = tl.zeros([256], dtype=tl.int32)
        if PASS < KEY_PASSES:
            prefix, remaining, ties = _key_digits(counts_ptr, sample, samples, k, PASS)
            shift = 24 - 8 * PASS
            for start in range(first, last, BLOCK):
                keys, index, in_row = _load_keys(row_ptr, start, values_per_sample, channels, pixels,
                                                 IS_BF16, CHANNELS_LAST, BLOCK)
                if PASS == 0:
                    matching = in_row
                else:
                    matching = in_row & ((keys >> (shift + 8)) == (prefix >> (shift + 8)))
                counts += tl.histogram(((keys >> shift) & 0xFF).to(tl.int32), 256, mask=matching)
        else:
            prefix, remaining, ties = _key_digits(counts_ptr, sample, samples, k, KEY_PASSES)
            if remaining < ties:  # more ties than places: search the cut-off index among them
                index_counts_ptr = counts_ptr + KEY_PASSES * samples * 256
                index_prefix, remaining = _index_digits(index_counts_ptr, sample, samples, remaining,
                                                        PASS - KEY_PASSES, INDEX_PASSES)
                shift = 8 * (INDEX_PASSES - 1 - (PASS - KEY_PASSES))
                for start in range(first, last, BLOCK):
                    keys, index, in_row = _load_keys(row_ptr, start, values_per_sample, channels, pixels,
                                                     IS_BF16, CHANNELS_LAST, BLOCK)
                    matching = in_row & (keys == prefix) & ((index >> (shift + 8)) == (index_prefix >> (shift + 8)))
                    counts += tl.histogram((index >> shift) & 0xFF, 256, mask=matching)
        tl.atomic_add(counts_ptr + (PASS * samples + sample).to(tl.int64) * 256 + tl.arange(0, 256), counts,
                      sem="relaxed")

    @triton.jit
    def _layer_mask_kernel(x_ptr, kept_ptr, counts_ptr, keep_ratio_ptr, values_per_sample, chunk, channels, pixels,
                           samples, IS_BF16: tl.constexpr, CHANNELS_LAST: tl.constexpr, KEY_PASSES: tl.constexpr,
                           INDEX_PASSES: tl.constexpr, BLOCK: tl.constexpr):
        """This chunk's mask: keys above the k-th largest, and the tied ones up to the cut-off index."""
        sample = tl.program_id(0)
        first = tl.program_id(1) * chunk
        last = tl.minimum(first + chunk, values_per_sample)
        base = sample.to(tl.int64) * values_per_sample
        k = _kept_count(keep_ratio_ptr, values_per_sample)
        prefix, remaining, ties = _key_digits(counts_ptr, sample, samples, k, KEY_PASSES)
        cutoff = values_per_sample
        if remaining < ties:
            cutoff, remaining = _index_digits(counts_ptr + KEY_PASSES * samples * 256, sample, samples, remaining,
                                              INDEX_PASSES, INDEX_PASSES)
        for start in range(first, last, BLOCK):
            keys, index, in_row = _load_keys(x_ptr + base, start, values_per_sample, channels, pixels,
                                             IS_BF16, CHANNELS_LAST, BLOCK)
            kept = (keys > prefix) | ((keys == prefix) & (index <= cutoff))
            tl.store(kept_ptr + base + start + tl.arange(0, BLOCK), kept.to(tl.int8), mask=in_row)


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """x's storage in memory order (a view): contiguous and channels_last maps are both dense."""
    if x.is_contiguous():
        return x.reshape(-1)
    return x.permute(0, 2, 3, 1).reshape(-1)


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make them x's, whatever the caller's is."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def zero_below_counting(x: torch.Tensor, threshold: torch.Tensor, counts: torch.Tensor, kept_index: int,
                        values_index: int, count: bool) -> torch.Tensor:
    """`threshold.zero_below(x, tau)` in one pass over x, tau read on the device from `threshold` (float32,
    one element). With `count`, the same pass adds x's `bit_histogram` (origin of tau) to counts[:HISTOGRAM_BINS],
    its kept count to counts[kept_index] and its value count to counts[values_index] (counts: int64). No autograd."""
    y = torch.empty_like(x)
    flat = _memory_order(x.detach())
    with _on_device_of(x):
        _network_kernel[(triton.cdiv(flat.numel(), _BLOCK),)](
            flat, _memory_order(y), counts, threshold, flat.numel(), kept_index, values_index,
            IS_BF16=x.dtype == torch.bfloat16, COUNT=count, BLOCK=_BLOCK)
    return y


def zero_below_backward(grad: torch.Tensor, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """zero_below's gradient: `grad` where x >= tau (exact in float32), everywhere at tau 0; one pass, out
    in x's memory format."""
    out = torch.empty_like(x, dtype=grad.dtype)
    if grad.stride() != out.stride():  # read in out's order (a copy only when the gradient's layout differs)
        grad = torch.empty_like(out).copy_(grad)
    flat = _memory_order(x.detach())
    with _on_device_of(x):
        _network_backward_kernel[(triton.cdiv(flat.numel(), _BLOCK),)](
            _memory_order(grad), flat, _memory_order(out), threshold, flat.numel(), BLOCK=_BLOCK)
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_per_sample(x: torch.Tensor, blocks_per_sample: int) -> int:
    """Enough programs for at least PROGRAMS_PER_SM per multiprocessor over the batch (a chunk is whole blocks)."""
    wanted = PROGRAMS_PER_SM * (_multiprocessors(x.device) if x.is_cuda else INTERPRETER_MULTIPROCESSORS)
    return max(1, min(blocks_per_sample, -(-wanted // x.shape[0])))


def top_k_mask(x: torch.Tensor, keep_ratio: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """`layer.top_k_mask` for k = max(1, int(rho * C*H*W)), rho read on the device from `keep_ratio`
    (float64, one element), bitwise; the mask has x's memory format.

    Each sample is split into chunks of whole `block`s, one program each, over one launch per digit
    (4 key digits in float32, 2 in bf16, then the index digits, which only do work when ties need a
    cut-off) and one for the mask; the programs of a sample add their digit histograms together."""
    samples, channels, height, width = x.shape
    values_per_sample = channels * height * width
    blocks_per_sample = -(-values_per_sample // block)
    chunk = -(-blocks_per_sample // _programs_per_sample(x, blocks_per_sample)) * block
    grid = (samples, -(-values_per_sample // chunk))
    key_passes = 2 if x.dtype == torch.bfloat16 else 4
    index_passes = max(1, -(-(values_per_sample - 1).bit_length() // _DIGIT_BITS))
    counts = torch.zeros((key_passes + index_passes) * samples * 256, dtype=torch.int32, device=x.device)
    kept = torch.empty_like(x, dtype=torch.int8)
    flat = _memory_order(x.detach())
    shape = dict(IS_BF16=x.dtype == torch.bfloat16, CHANNELS_LAST=not x.is_contiguous(), KEY_PASSES=key_passes,
                 INDEX_PASSES=index_passes, BLOCK=block)
    with _on_device_of(x):
        for digit_pass in range(key_passes + index_passes):
            _layer_pass_kernel[grid](flat, counts, keep_ratio, values_per_sample, chunk, channels, height * width,
                                     samples, PASS=digit_pass, **shape)
        _layer_mask_kernel[grid](flat, _memory_order(kept), counts, keep_ratio, values_per_sample, chunk, channels,
                                 height * width, samples, **shape)
    return kept.view(torch.bool)
