"""The activation constraint a model calls at every site, and the per-step statistics the loop reads.

One `ActivationSparsity` owns the keep ratio rho, the network-scope threshold tau and the statistics
of the current training step. The model receives `new_site` as its site factory; every site module
forwards to the owner, so changing rho or tau changes every site at once.

Statistics are counted on the device during training forwards (`collecting`) and all-reduced as
integers in `finish_step`, which chooses the next tau there too, so every replica sees the same
numbers and derives the same tau. Nothing is read off the device until a statistic is logged (or
`calibrate` runs, at evaluation).

rho is set on the host (by the controller); rho and tau live in one-element tensors on the device
(`to(device)`), which the sites read when they run the Triton kernels or run inside torch.compile:
a new rho or tau then changes no compiled graph and needs no host round trip. The CPU eager path
reads tau on the host, where that costs nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from sparsedist.sparsity import kernels, ops
from sparsedist.sparsity.layer import keep_where, kept_per_sample, key_dtype, top_k_per_sample
from sparsedist.sparsity.threshold import (
    HISTOGRAM_BINS,
    add_site_counts,
    bit_histogram,
    bits_to_float,
    float_to_bits,
    histogram_origin,
    threshold_for_count,
    value_step_bits,
    zero_below,
)

Scope = Literal["layer", "network"]
SCOPES = ("layer", "network")


class StepStats:
    """One training step's all-reduced statistics: `numbers` (float64, on the device) holds the kept
    count of every site, then the value count of every site, then the tau the step ran with. They are
    read when a field is (a logging point), or from a host copy the loop made of `numbers` (`read_from`)."""

    def __init__(self, kept: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor, site_names: list[str]):
        self.numbers = torch.cat([kept.double(), values.double(), threshold.to(torch.float64).view(1)])
        self._site_names = site_names
        self._host: tuple[list[int], list[int], float] | None = None

    def read_from(self, numbers: list[float]) -> None:
        """Take the fields from a host copy of `numbers` instead of reading the device."""
        sites = len(self._site_names)
        self._host = [int(k) for k in numbers[:sites]], [int(v) for v in numbers[sites:2 * sites]], numbers[-1]

    def _fields(self) -> tuple[list[int], list[int], float]:
        if self._host is None:
            self.read_from(self.numbers.tolist())
        return self._host

    @property
    def realized_keep(self) -> float:
        """Fraction of all site values of the global batch that were nonzero after the constraint."""
        kept, values, _ = self._fields()
        return sum(kept) / sum(values)

    @property
    def site_density(self) -> dict[str, float]:
        """The same fraction per site (sites that ran)."""
        kept, values, _ = self._fields()
        return {name: k / v for name, k, v in zip(self._site_names, kept, values) if v}

    @property
    def threshold(self) -> float:
        """The tau this step ran with (network scope; always 0.0 in layer scope)."""
        return self._fields()[2]


@dataclass(frozen=True)
class CalibrationResult:
    threshold: float  # the best tau found (0.0 when rho is above the fraction of positive values)
    realized_keep: float  # realized keep ratio measured with it (NaN in layer scope: nothing measured)
    iterations: int  # forward passes over the calibration batches
    converged: bool  # |realized / rho - 1| <= tolerance


class SparsitySite(nn.Module):
    """The module a model applies after a ReLU; it holds no state of its own."""

    def __init__(self, owner: ActivationSparsity, index: int, name: str):
        super().__init__()
        self.owner = owner
        self.index = index
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.apply_site(self.index, x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scope={self.owner.scope}"


def _check_keep_ratio(keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


class ActivationSparsity:
    """Top-k activation sparsity in `layer` scope (per sample and site) or `network` scope (one tau).

    Network scope: tau for step t is chosen from step t-1's all-reduced statistics (step 0 is dense);
    `set_keep_ratio` re-chooses it from the same statistics for the controller's new rho.

    `use_kernels`: run the Triton kernels (`sparsity.kernels`, bitwise the same results) where they
    apply; None means on CUDA tensors only. True on CPU needs TRITON_INTERPRET=1 (tests).
    """

    def __init__(self, scope: Scope, keep_ratio: float = 1.0, use_kernels: bool | None = None):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.use_kernels = use_kernels
        self.collecting = True
        self._keep_ratio = _check_keep_ratio(keep_ratio)
        self._site_names: list[str] = []
        # The same rho (float64) and tau (float32) on the device, for kernels and compiled graphs.
        self._keep_ratio_tensor = torch.tensor(self._keep_ratio, dtype=torch.float64)
        self._threshold_tensor = torch.tensor(0.0, dtype=torch.float32)
        # This step's counts on the device: [histogram (network scope) | kept per site | values per site].
        self._counts: torch.Tensor | None = None
        self._recorded = False  # whether _counts holds a step's statistics
        self._site_step_bits: list[int | None] = []  # bit spacing of each site's dtype (see value_step_bits)
        # The last reduced histogram, its origin and value count (on the device) and value spacing:
        # lets set_keep_ratio re-choose tau.
        self._last_histogram: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        # Scratch for the integer arithmetic of every site: on CPU a fresh large allocation page-faults
        # on first touch and costs more than the arithmetic itself.
        self._workspace_bytes: torch.Tensor | None = None

    # ------------------------------------------------------------------ model side
    def new_site(self, name: str) -> nn.Module:
        if self._recorded:
            raise RuntimeError("sites must all be created before the first forward")
        self._site_names.append(name)
        self._site_step_bits.append(None)
        self._counts = None  # sized by the number of sites: made anew by the next `to` or forward
        return SparsitySite(self, len(self._site_names) - 1, name)

    def to(self, device: torch.device | str) -> ActivationSparsity:
        """Keep rho, tau and the step counts on `device` (the sites' device; done by the first forward
        too, but a compiled model should find them there already)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
        size = self._histogram_bins + 2 * len(self._site_names)
        if self._counts is None or self._counts.device != device or len(self._counts) != size:
            if self._recorded:
                raise RuntimeError("cannot move with step statistics pending: call finish_step() or discard_step() first")
            self._keep_ratio_tensor = self._keep_ratio_tensor.to(device)
            self._threshold_tensor = self._threshold_tensor.to(device)
            self._counts = torch.zeros(size, dtype=torch.int64, device=device)
            if device.type == "cuda":
                # A compiled step adds into the counts in place; at a fixed address, reduce-overhead's CUDA
                # graphs keep that mutation (inductor skips the graphs for a mutated input whose address may change).
                torch._dynamo.mark_static_address(self._counts)
        return self

    def apply_site(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._counts is None or self._counts.device != x.device:  # cheap: every site, every forward
            self.to(x.device)
        use_kernel = (x.is_cuda if self.use_kernels is None else self.use_kernels) and kernels.supports(x, self.scope)
        on_device = use_kernel or torch.compiler.is_compiling()  # rho and tau read from their tensors
        if self.scope == "layer":
            if not torch.compiler.is_compiling() and self._keep_ratio >= 1.0:  # in this order: no guard on rho
                y = x  # dense: nothing to select (a compiled graph reads rho from its tensor instead)
            elif on_device:
                y = keep_where(x, ops.top_k_mask(x, self._keep_ratio_tensor, use_kernel))
            else:
                y = top_k_per_sample(x, self._keep_ratio, self._workspace(x.numel(), key_dtype(x.dtype), x.device))
            if self.collecting:
                self._record(index, x, y)
        elif on_device:  # the op adds the counts itself: one kernel launch on CUDA
            y = ops.zero_below_and_count(x, self._threshold_tensor, self._counts, *self._count_indices(index),
                                         self.collecting, use_kernel)
        else:
            threshold = self.threshold  # a host read: this is the CPU path
            y = zero_below(x, threshold)
            if self.collecting:
                histogram = bit_histogram(x, histogram_origin(threshold), self._workspace(x.numel(), torch.int32, x.device))
                add_site_counts(self._counts, histogram, *self._count_indices(index), x.numel())
        if self.collecting:
            self._site_step_bits[index] = value_step_bits(x.dtype)
            self._recorded = True
        return y

    def _workspace(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`numel` scratch elements of `dtype`, reused across sites and steps (grown when too small)."""
        nbytes = numel * dtype.itemsize
        workspace = self._workspace_bytes
        if workspace is None or workspace.device != device or workspace.numel() < nbytes:
            workspace = self._workspace_bytes = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return workspace[:nbytes].view(dtype)

    def _count_indices(self, index: int) -> tuple[int, int]:
        """Where site `index`'s kept and value counts sit in the step's counts."""
        kept_index = self._histogram_bins + index
        return kept_index, kept_index + len(self._site_names)

    def _record(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Layer scope: the site's kept (nonzero) and value counts."""
        kept_index, values_index = self._count_indices(index)
        # bool().sum() counts what count_nonzero counts (NaN included), 10x faster on CPU, and there
        # 2.5x faster again summed in int32 (exact below 2**31 values)
        exact_in_int32 = y.is_cpu and y.numel() < 2**31
        self._counts[kept_index] += y.bool().sum(dtype=torch.int32 if exact_in_int32 else None)
        self._counts[values_index] += x.numel()

    # ------------------------------------------------------------------ loop side
    @property
    def keep_ratio(self) -> float:
        return self._keep_ratio

    @property
    def threshold(self) -> float:
        """The tau in force (network scope); 0.0 means dense, and always in layer scope.

        tau lives on the device (a step chooses it there): reading it waits for the device."""
        return self._threshold_tensor.item()

    @property
    def threshold_tensor(self) -> torch.Tensor:
        """tau in force as a float32 scalar on the device."""
        return self._threshold_tensor

    @property
    def site_names(self) -> list[str]:
        return list(self._site_names)

    @property
    def _histogram_bins(self) -> int:
        return HISTOGRAM_BINS if self.scope == "network" else 0

    @property
    def statistics_nbytes(self) -> int:
        """Bytes each replica all-reduces per step: int64 histogram, kept and value counts per site."""
        return (self._histogram_bins + 2 * len(self._site_names)) * 8

    def _set(self, keep_ratio: float, threshold: float | torch.Tensor) -> None:
        """The one place rho and tau change: rho on the host and the device, tau on the device."""
        if self.scope == "network" and self._recorded:
            raise RuntimeError("tau changed while step statistics were pending: call finish_step() or discard_step() first")
        if keep_ratio != self._keep_ratio:  # fills and device copies: no host round trip
            self._keep_ratio = keep_ratio
            self._keep_ratio_tensor.fill_(keep_ratio)
        if isinstance(threshold, torch.Tensor):
            self._threshold_tensor.copy_(threshold)
        else:
            self._threshold_tensor.fill_(threshold)

    def set_keep_ratio(self, keep_ratio: float) -> None:
        keep_ratio = _check_keep_ratio(keep_ratio)
        if keep_ratio == self._keep_ratio:
            return  # finish_step already chose tau for this rho: called every step, most calls change nothing
        self._set(keep_ratio, self._next_threshold(keep_ratio))

    def _next_threshold(self, keep_ratio: float) -> float | torch.Tensor:
        """tau for `keep_ratio` from the last step's statistics (network scope; 0.0 in layer scope)."""
        if self.scope == "layer" or keep_ratio >= 1.0:
            return 0.0
        if self._last_histogram is None:  # no statistics yet (first step, or just resumed): keep tau
            return self._threshold_tensor.clone()
        histogram, origin, values, step_bits = self._last_histogram
        # k = max(1, int(rho * values)) as kept_per_sample, on the device
        target = (values.double() * keep_ratio).floor().clamp(min=1).to(torch.int64)
        return threshold_for_count(histogram, origin, target, step_bits)

    def finish_step(self, process_group: dist.ProcessGroup | None = None,
                    skipped: torch.Tensor | None = None) -> StepStats:
        """All-reduce this step's statistics, return them, and (network scope) choose the next tau.

        `skipped` (a bool on the device, the same on every replica) marks a step whose update was
        dropped: tau then stays as it is. All on the device: nothing here waits for it."""
        threshold_used = self._threshold_tensor.clone()
        histogram, origin, kept, values, step_bits = self._reduce_pending(process_group)
        if self.scope == "network":
            self._last_histogram = (histogram, origin, values.sum(), step_bits)
            # At rho 1 this is the float 0.0: where() and fill_ take it as it is (a tensor made from it
            # would be a host-to-device copy, which waits for the device).
            threshold = self._next_threshold(self._keep_ratio)
            if skipped is not None:
                threshold = torch.where(skipped, threshold_used, threshold)
            self._set(self._keep_ratio, threshold)
        return StepStats(kept, values, threshold_used, self._site_names)

    def discard_step(self) -> None:
        """Drop this step's statistics (a skipped step); tau and rho stay as they are."""
        if self._counts is not None:
            self._counts.zero_()
        self._recorded = False

    def _reduce_pending(self, process_group: dist.ProcessGroup | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One all-reduce of [histogram | kept per site | values per site]; clears the pending step.

        Returns (on the device) the histogram, its origin (of the tau in force), kept and value
        counts per site, and the value spacing."""
        if not self._recorded:
            raise RuntimeError("no statistics: run a forward with collecting=True since the last finish_step()")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts, group=process_group)
        reduced = self._counts.clone()
        self.discard_step()
        sites = len(self._site_names)
        histogram, kept, values = reduced.split([self._histogram_bins, sites, sites])
        origin = self._threshold_tensor.view(torch.int32).to(torch.int64).clamp(min=1)  # as histogram_origin
        step_bits = min(bits for bits in self._site_step_bits if bits is not None)
        return histogram, origin, kept, values, step_bits

    # ------------------------------------------------------------------ evaluation
    def set_regime(self, keep_ratio: float, threshold: float | None = None) -> None:
        """Fix rho (layer scope) or rho and its tau (network scope) until changed again (evaluation, deployment)."""
        keep_ratio = _check_keep_ratio(keep_ratio)
        if self.scope == "network":
            if threshold is None:
                if keep_ratio < 1.0:
                    raise ValueError("network scope below rho = 1 needs a threshold: calibrate() one for this rho")
                threshold = 0.0
            threshold = bits_to_float(float_to_bits(threshold))  # tau is always a float32 value
        elif threshold is not None:
            raise ValueError("layer scope has no threshold")
        self._set(keep_ratio, threshold or 0.0)

    @contextlib.contextmanager
    def regime(self, keep_ratio: float, threshold: float | None = None) -> Iterator[None]:
        """Run at another rho (layer scope) or a fixed tau (network scope); restores rho and tau after."""
        saved = self._keep_ratio, self._threshold_tensor.clone()
        self.set_regime(keep_ratio, threshold)
        try:
            yield
        finally:
            self._set(*saved)

    def calibrate(self, run_forward: Callable[[], None], keep_ratio: float, tolerance: float = 0.01,
                  max_iters: int = 8, process_group: dist.ProcessGroup | None = None) -> CalibrationResult:
        """Find the network-scope tau that realizes `keep_ratio` on the batches `run_forward` runs.

        Each pass measures the realized keep ratio at the current tau and proposes the next tau from
        that pass's own histogram (a fixed-point iteration: later sites see the earlier sites'
        masks). Proposals are kept inside the bracket of taus known to keep too much / too little,
        bisecting in bit space otherwise; in bf16 both move on the grid of bf16 values, so every pass
        tries a tau that keeps a different set. Returns the best tau measured. Layer scope: nothing to do.
        """
        keep_ratio = _check_keep_ratio(keep_ratio)
        if self.scope == "layer":
            return CalibrationResult(threshold=0.0, realized_keep=math.nan, iterations=0, converged=True)
        if self._recorded:
            raise RuntimeError("calibrate() with step statistics pending: call finish_step() or discard_step() first")
        saved = self._keep_ratio, self._threshold_tensor.clone(), self.collecting
        self.collecting = True
        keeps_too_much, keeps_too_little = 0, float_to_bits(math.inf) + 1  # tau bit patterns bracketing the answer
        tau_bits, best = 0, None
        try:
            for iteration in range(1, max_iters + 1):
                self._set(keep_ratio, bits_to_float(tau_bits))
                run_forward()
                histogram, origin, kept, values, step_bits = self._reduce_pending(process_group)
                kept, values = kept.sum().item(), values.sum().item()
                realized = kept / values
                error = abs(realized / keep_ratio - 1.0)
                if best is None or error < best[0]:
                    best = (error, bits_to_float(tau_bits), realized)
                if error <= tolerance:
                    break
                if realized > keep_ratio:
                    keeps_too_much = max(keeps_too_much, tau_bits)
                else:
                    keeps_too_little = min(keeps_too_little, tau_bits)
                target = kept_per_sample(values, keep_ratio)
                proposal = float_to_bits(threshold_for_count(histogram, origin, target, step_bits).item())
                if proposal in (keeps_too_much, keeps_too_little):  # a tried tau: its untried neighbour inside
                    proposal += step_bits if proposal == keeps_too_much else -step_bits
                if not keeps_too_much < proposal < keeps_too_little:
                    # Bisect on the values' own grid: bf16 taus between two bf16 values all keep the same.
                    proposal = (keeps_too_much + keeps_too_little) // 2 // step_bits * step_bits
                if proposal <= keeps_too_much:  # no untried tau inside the bracket (e.g. rho above the positive fraction)
                    break
                tau_bits = proposal
        finally:
            self.discard_step()
            self._set(*saved[:2])
            self.collecting = saved[2]
        error, threshold, realized = best
        return CalibrationResult(threshold=threshold, realized_keep=realized, iterations=iteration,
                                 converged=error <= tolerance)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, float | str]:
        """Plain data (loads with torch.load(weights_only=True)); taken between steps."""
        return {"scope": self.scope, "keep_ratio": self._keep_ratio, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        if state["scope"] != self.scope:
            raise ValueError(f"checkpoint has scope {state['scope']!r}, this run uses {self.scope!r}")
        self._set(_check_keep_ratio(state["keep_ratio"]), float(state["threshold"]))
        self._last_histogram = None
