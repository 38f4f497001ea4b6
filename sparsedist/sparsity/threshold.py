"""Network scope: one threshold tau for every site, chosen from integer histograms of float bit patterns.

Why bit patterns: for non-negative IEEE floats the int32 bit pattern orders like the value, so
counting values by (bits - origin) >> 16 is an exact, integer histogram whose bins are 1/128 of a
binade wide. Integers all-reduce exactly, so every replica derives the bitwise-identical tau from
the same summed counts, and the statistics never gather activations: their size is fixed
(`HISTOGRAM_BINS` int64 counts, 512 KiB) whatever the batch size.

Bins are laid out relative to an `origin` bit pattern (that of the tau in force, or 1 when tau is 0):
bin r holds the patterns origin + [r * 2**16, (r + 1) * 2**16) and is stored at index r mod 2**16.
So the values kept by tau (x >= tau) are exactly those in bins r >= 0, stored below `KEPT_BINS`:
the same histogram gives the exact kept count of every site at no extra cost. With origin 1 (tau 0)
the zeros sit alone in bin -1, so the kept count is then the exact nonzero count.
"""

from __future__ import annotations

import functools
import struct

import torch
from torch.nn import functional as F

BIN_SHIFT = 16
HISTOGRAM_BINS = 1 << 16
KEPT_BINS = HISTOGRAM_BINS // 2  # stored indices of the bins r >= 0 (non-negative offsets from origin)
_MAGNITUDE = 0x7FFFFFFF  # clears the sign bit: relu(-0.0) is -0.0, which must count as zero
_LARGEST_BITS = 0x7F800000  # +inf; tau never goes above it
# Low mantissa bits that are always zero once a narrower float is widened to float32 (23 - its 7 or 10).
_VALUE_STEP_BITS = {torch.bfloat16: 1 << 16, torch.float16: 1 << 13}


def float_to_bits(value: float) -> int:
    """The float32 bit pattern of `value` as a Python int."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def histogram_origin(threshold: float) -> int:
    """The origin bit pattern for statistics gathered while `threshold` is in force."""
    return max(float_to_bits(threshold), 1)


def bit_histogram(x: torch.Tensor, origin: int, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Counts (int64, `HISTOGRAM_BINS`, on x.device) of x's values by float32 bit pattern relative to origin.

    x must be non-negative (a ReLU output); bf16/fp16 values are widened exactly to float32 first.
    The bin arithmetic runs in place in `workspace` (int32, at least x.numel() elements, on x.device)
    when given, instead of a fresh allocation. index_add_ (unlike bincount on CUDA) needs no device
    sync to size its output.
    """
    x = x.detach()
    bits = (x if x.dtype == torch.float32 else x.float()).view(torch.int32)
    out = None if workspace is None else workspace[: x.numel()].view(x.shape)
    bins = torch.bitwise_and(bits, _MAGNITUDE, out=out)
    bins.sub_(origin).bitwise_right_shift_(BIN_SHIFT).bitwise_and_(HISTOGRAM_BINS - 1)
    bins = bins.reshape(-1)
    counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64, device=x.device)
    return counts.index_add_(0, bins, torch.ones((), dtype=torch.int64, device=x.device).expand(bins.numel()))


def add_site_counts(counts: torch.Tensor, histogram: torch.Tensor, kept_index: int, values_index: int,
                    numel: int) -> None:
    """Add a site's histogram to counts[:HISTOGRAM_BINS], its kept count (the bins below KEPT_BINS) to
    counts[kept_index] and its value count to counts[values_index], on the device."""
    counts[:HISTOGRAM_BINS] += histogram
    counts[kept_index] += histogram[:KEPT_BINS].sum()
    counts[values_index] += numel


def value_step_bits(dtype: torch.dtype) -> int:
    """Spacing of `dtype`'s values in float32 bit patterns: bf16 values widen to patterns 2**16 apart."""
    return _VALUE_STEP_BITS.get(dtype, 1)


def threshold_for_count(histogram: torch.Tensor, origin: int | torch.Tensor, target: int | torch.Tensor,
                        step_bits: int = 1) -> torch.Tensor:
    """The tau that keeps about `target` values of a histogram made with `origin` (0.0: keep everything).

    Bins are walked from the top; inside the bin where the count reaches `target` tau is interpolated
    linearly in bit space (the bin spans 1/128 of a binade, so the density is nearly flat there) and
    rounded to the nearest multiple of `step_bits`, the spacing of the values counted: a bf16 bin
    holds one value, which is then kept or dropped whole, whichever lands nearer the target.
    Values in the bin holding bit pattern 0 (zeros, and subnormals below ~1e-40) never survive a
    positive tau, so when `target` reaches the count above that bin nothing can be removed: tau = 0.

    Tensor arithmetic only, on the histogram's device: a training step chooses tau without a host
    round trip. Counts are compared as integers (a float target would promote them to float32,
    inexact above 2**24) and the interpolation runs in float64 like Python's, so equal inputs give
    the bitwise-equal tau. Returns a float32 scalar tensor.
    """
    device = histogram.device
    origin = torch.as_tensor(origin, dtype=torch.int64, device=device)
    target = torch.as_tensor(target, dtype=torch.int64, device=device)
    # Reorder from storage (r mod 2**16) to ascending offsets r = -2**15 ... 2**15 - 1 (ordered index r + 2**15).
    ordered = histogram.roll(KEPT_BINS)
    # The bin holding bit pattern 0 is the lowest occupied one (values are non-negative): drop it.
    zero_bin = torch.bitwise_right_shift(-origin, BIN_SHIFT) + KEPT_BINS
    positive = ordered.index_fill(0, zero_bin.view(1), 0)
    at_or_above = positive.flip(0).cumsum(0).flip(0)  # values in this bin or higher
    index = ((at_or_above >= target).sum() - 1).clamp(min=0).view(1)  # the last bin reaching target
    in_bin = positive.index_select(0, index).clamp(min=1)
    above = at_or_above.index_select(0, index) - in_bin
    steps_in_bin = (1 << BIN_SHIFT) // step_bits
    steps_kept = torch.round((target - above).double() / in_bin.double() * steps_in_bin).to(torch.int64)
    bin_top = origin + (index - KEPT_BINS + 1) * (1 << BIN_SHIFT)  # offsets can be negative: no << here
    tau_bits = -torch.div(-bin_top, step_bits, rounding_mode="floor") * step_bits - steps_kept * step_bits
    tau_bits = torch.where(target >= at_or_above[0], 0, tau_bits.clamp(max=_LARGEST_BITS))
    return tau_bits.to(torch.int32).view(torch.float32).view(())


@functools.lru_cache(maxsize=64)
def _largest_below(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` strictly below `threshold`, so that x > it <=> x >= threshold."""
    below = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if below.item() >= threshold:
        below = torch.nextafter(below, torch.zeros_like(below))
    return below.item()


def zero_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """y = x where x >= threshold else 0, gradients only through kept values; identity for threshold <= 0.

    F.threshold is one fused pass each way, and the input it saves for backward is the ReLU output
    the ReLU already saved, so the constraint costs no extra activation memory.
    """
    if threshold <= 0.0:
        return x
    return F.threshold(x, _largest_below(threshold, x.dtype), 0.0)
