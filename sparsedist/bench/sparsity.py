"""Train-step cost of the activation constraint: dense vs both scopes vs plain reference implementations.

Every variant trains its own copy of one seeded WRN on one random batch (forward, backward, SGD
step, and for the two product scopes `finish_step`); the variants take turns step by step, so load
from other processes hits them alike. Reported: median seconds per step and the ratio over dense, in
wall-clock time (the target) and in process CPU time (robust to time-slicing on a shared machine
when run with one thread; with more it also counts OpenMP workers' spin-waits).

On CUDA every step is timed between two synchronizations, in bf16 autocast with channels_last maps
when asked (the GPU recipe); `compile` adds torch.compile'd copies of dense and both scopes,
reported against the same eager dense step.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sparsedist.bench import median_latencies, run_benchmark
from sparsedist.models.wrn import WideResNet, identity_site
from sparsedist.sparsity import ActivationSparsity, ops
from sparsedist.sparsity.layer import keep_where, kept_per_sample, top_k_per_sample
from sparsedist.sparsity.threshold import HISTOGRAM_BINS, bit_histogram, histogram_origin, zero_below

# Largest step time over dense's (issue 10): CPU fp32 batch 32, and CUDA bf16 batch 128.
TARGET_RATIO = {"cpu": {"network": 1.03, "layer": 1.10}, "cuda": {"network": 1.05, "layer": 1.05}}
VARIANTS = ("dense", "layer", "network", "layer_reference", "network_reference")
COMPILED_VARIANTS = ("dense_compiled", "layer_compiled", "network_compiled")


def reference_top_k_per_sample(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Brute force: torch.topk of each sample's flattened map, scattered into zeros."""
    flat = x.reshape(len(x), -1)
    values, indices = flat.topk(kept_per_sample(flat.shape[1], keep_ratio), dim=1)
    return torch.zeros_like(flat).scatter(1, indices, values).view_as(x)


def reference_network_threshold(site_values: list[torch.Tensor], keep_ratio: float) -> float:
    """Brute force: the smallest of the top rho * N values of all sites, by one global torch.topk."""
    values = torch.cat([v.detach().reshape(-1) for v in site_values])
    return values.topk(max(1, int(keep_ratio * values.numel())), sorted=False).values.min().item()


def reference_site_threshold_mask(x: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Brute force for one site of network scope: its threshold by torch.topk, then the mask."""
    threshold = x.reshape(-1).topk(max(1, int(keep_ratio * x.numel())), sorted=False).values.min()
    return torch.where(x >= threshold, x, 0.0)


class _LambdaSite(nn.Module):
    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


class _ReferenceNetwork:
    """One tau for all sites from a global topk over the previous step's site inputs (kept alive by autograd)."""

    def __init__(self, keep_ratio: float):
        self.keep_ratio = keep_ratio
        self.threshold = 0.0
        self.site_inputs: list[torch.Tensor] = []

    def site(self, name: str) -> nn.Module:
        return _LambdaSite(self.apply)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.site_inputs.append(x)
        return torch.where(x >= self.threshold, x, 0.0)

    def finish_step(self) -> None:
        self.threshold = reference_network_threshold(self.site_inputs, self.keep_ratio)
        self.site_inputs = []


def _step_function(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, autocast: Callable,
                   after_backward: Callable[[], object]) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        after_backward()

    return step


def run_sparsity_benchmark(batch_size: int = 32, keep_ratio: float = 0.1, repeats: int = 5, warmup: int = 2,
                           depth: int = 28, widen_factor: int = 4, image_size: int = 32, seed: int = 0,
                           threads: int | None = None, json_out: str | None = None, device: str = "cpu",
                           precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                           compile_mode: str = "default", cudnn_benchmark: bool = False) -> dict:
    """Median train-step seconds of every variant and their ratios over eager dense.

    `threads` sets torch's intra-op threads for the run (None: as they are); on a machine shared
    with other work, one thread suffers least from descheduled OpenMP workers. The load average
    before and after is reported so that a reader can judge the noise. `precision` bf16 or fp16 runs
    the forward in that autocast; `compile` adds the compiled variants (their compilation happens in
    the warm-up steps), in torch.compile's `compile_mode` (reduce-overhead: CUDA graphs). cuDNN runs as training runs it (deterministic, no autotuner) unless
    `cudnn_benchmark`, the released script's setting, which training does not use (resume is bitwise).

    Returns {"setup": {...}, "median_step_s": {variant: s}, "ratio_to_dense": {variant: r},
    "images_per_s": {variant: n}, "median_cpu_s": {variant: s}, "cpu_ratio_to_dense": {variant: r},
    "targets": {scope: max wall ratio}, "meets_target": {scope: bool}, "realized_keep": {scope: fraction}}
    with variants dense, layer, network, layer_reference, network_reference (and, compiled,
    dense_compiled, layer_compiled, network_compiled). The warm-up steps also give network scope
    its first threshold (step 0 is dense by definition).
    """
    options = _Options(torch.device(device), precision, channels_last, compile, compile_mode)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = not cudnn_benchmark, cudnn_benchmark
    try:
        return run_benchmark(
            lambda: _measure(batch_size, keep_ratio, repeats, warmup, depth, widen_factor, image_size, seed, options),
            format_table, threads=threads, json_out=json_out,
        )
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@dataclass(frozen=True)
class _Options:
    device: torch.device
    precision: str  # fp32, bf16 or fp16 (autocast)
    channels_last: bool
    compile: bool
    compile_mode: str  # torch.compile's mode for the compiled variants

    def autocast(self):
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _measure(batch_size: int, keep_ratio: float, repeats: int, warmup: int, depth: int, widen_factor: int,
             image_size: int, seed: int, options: _Options) -> dict:
    load_before = os.getloadavg()[0]
    device = options.device
    generator = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)

    def model(make_site: Callable[[str], nn.Module] = identity_site) -> nn.Module:
        torch.manual_seed(seed)  # the same initial weights for every variant
        return WideResNet(depth, widen_factor, make_site=make_site).to(device, memory_format=memory_format)

    variants = VARIANTS + (COMPILED_VARIANTS if options.compile else ())
    scopes = {name: ActivationSparsity(name.split("_")[0], keep_ratio=keep_ratio)
              for name in variants if name.split("_")[0] in ("layer", "network") and "reference" not in name}
    reference_network = _ReferenceNetwork(keep_ratio)
    last_stats = {}

    def step_for(name: str) -> Callable[[], None]:
        if name.startswith("dense"):
            network, after = model(), lambda: None
        elif name == "layer_reference":
            network = model(lambda site: _LambdaSite(lambda x: reference_top_k_per_sample(x, keep_ratio)))
            after = lambda: None
        elif name == "network_reference":
            network, after = model(reference_network.site), reference_network.finish_step
        else:
            sparsity = scopes[name]
            network = model(sparsity.new_site)
            sparsity.to(device)

            def after() -> None:
                last_stats[name] = sparsity.finish_step()
        if name.endswith("_compiled"):
            network = torch.compile(network, mode=options.compile_mode)
        return _step_function(network, images, labels, options.autocast, after)

    steps = {name: step_for(name) for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(warmup + repeats):
        for name in variants:
            options.synchronize()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            options.synchronize()
            if repeat >= warmup:
                wall[name].append(time.perf_counter() - wall_start)
                cpu[name].append(time.process_time() - cpu_start)

    medians = {name: statistics.median(times) for name, times in wall.items()}
    ratios = {name: medians[name] / medians["dense"] for name in variants}
    cpu_medians = {name: statistics.median(times) for name, times in cpu.items()}
    targets = TARGET_RATIO["cuda" if device.type == "cuda" else "cpu"]
    return {
        "setup": {"batch_size": batch_size, "keep_ratio": keep_ratio, "depth": depth, "widen_factor": widen_factor,
                  "image_size": image_size, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                  "device": str(device), "dtype": "float32" if options.precision == "fp32" else f"{options.precision} autocast",
                  "cudnn": "benchmark (autotuned)" if torch.backends.cudnn.benchmark else "deterministic, as training",
                  "channels_last": options.channels_last, "compile": options.compile,
                  "compile_mode": options.compile_mode if options.compile else None,
                  "load_average_1min": [load_before, os.getloadavg()[0]]},
        "median_step_s": medians,
        "ratio_to_dense": ratios,
        "images_per_s": {name: batch_size / seconds for name, seconds in medians.items()},
        "median_cpu_s": cpu_medians,
        "cpu_ratio_to_dense": {name: cpu_medians[name] / cpu_medians["dense"] for name in variants},
        "targets": dict(targets),
        "meets_target": {scope: ratios[scope] <= limit for scope, limit in targets.items()},
        "realized_keep": {name: stats.realized_keep for name, stats in last_stats.items()},
    }


def site_shapes(depth: int, widen_factor: int, image_size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of every sparsity site of a WRN on square RGB images, in forward order."""
    shapes: list[tuple[int, int, int]] = []

    def recording_site(name: str) -> nn.Module:
        return _LambdaSite(lambda x: shapes.append(tuple(x.shape[1:])) or x)

    with torch.no_grad():
        WideResNet(depth, widen_factor, make_site=recording_site)(torch.zeros(1, 3, image_size, image_size))
    return shapes


def run_site_benchmark(batch_size: int = 128, keep_ratio: float = 0.1, depth: int = 28, widen_factor: int = 4,
                       image_size: int = 32, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       channels_last: bool = True, repeats: int = 20) -> dict:
    """Forward cost of the constraint alone on every site shape of a WRN: kernels vs the alternatives.

    Per distinct shape, the median milliseconds of: `layer` by the kernel (mask + where), by
    torch.topk + scatter (the plain reference) and by the eager path; `network` by the fused kernel,
    by torch.topk over the site + mask (its plain reference) and by the eager path (histogram +
    threshold, two passes). Totals weigh shapes by their site
    count. Inputs are relu(randn) maps; tau keeps about rho of them.
    """
    device = torch.device(device)
    synchronize = partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    keep_ratio_tensor = torch.tensor(keep_ratio, dtype=torch.float64, device=device)
    counts: dict[tuple[int, int, int], int] = {}
    for shape in site_shapes(depth, widen_factor, image_size):
        counts[shape] = counts.get(shape, 0) + 1
    per_shape, total = [], {"layer": {}, "network": {}}
    for shape, sites in counts.items():
        generator = torch.Generator().manual_seed(shape[0])
        x = torch.relu(torch.randn(batch_size, *shape, generator=generator)).to(device, dtype, memory_format=memory_format)
        tau = float(x.flatten()[: 1 << 20].float().quantile(1 - keep_ratio))
        tau_tensor = torch.tensor(tau, device=device)
        counts_buffer = torch.zeros(HISTOGRAM_BINS + 2, dtype=torch.int64, device=device)  # one site's step counts
        variants = {
            "layer": {"kernel": lambda: keep_where(x, ops.top_k_mask(x, keep_ratio_tensor, True)),
                      "topk_scatter": lambda: reference_top_k_per_sample(x, keep_ratio),
                      "eager": lambda: top_k_per_sample(x, keep_ratio)},
            "network": {"kernel": lambda: ops.zero_below_counting(x, tau_tensor, counts_buffer, HISTOGRAM_BINS,
                                                                  HISTOGRAM_BINS + 1, True, True),
                        "topk_where": lambda: reference_site_threshold_mask(x, keep_ratio),
                        "eager": lambda: (zero_below(x, tau), bit_histogram(x, histogram_origin(tau)))},
        }
        row = {"shape": list(shape), "sites": sites}
        for scope, functions in variants.items():
            timed = median_latencies(functions, repeats, warmup=1, synchronize=synchronize)
            row[scope] = {f"{name}_ms": ms for name, ms in timed.items()}
            for key, ms in row[scope].items():
                total[scope][key] = total[scope].get(key, 0.0) + sites * ms
        per_shape.append(row)
    for scope in total:
        total[scope]["compared"] = [key.removesuffix("_ms") for key in total[scope] if key != "kernel_ms"]
    return {"setup": {"batch_size": batch_size, "keep_ratio": keep_ratio, "depth": depth, "widen_factor": widen_factor,
                      "device": str(device), "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last,
                      "repeats": repeats},
            "per_shape": per_shape, "total": total}


def format_table(result: dict) -> str:
    lines = [f"{'variant':<18} {'wall s':>8} {'x dense':>8} {'images/s':>10} {'cpu s':>8} {'x dense':>8}"]
    for name in result["median_step_s"]:
        lines.append(f"{name:<18} {result['median_step_s'][name]:>8.4f} {result['ratio_to_dense'][name]:>8.3f} "
                     f"{result['images_per_s'][name]:>10.0f} {result['median_cpu_s'][name]:>8.4f} "
                     f"{result['cpu_ratio_to_dense'][name]:>8.3f}")
    setup = result["setup"]
    lines.append(f"{setup['device']} {setup['dtype']}{' channels_last' if setup['channels_last'] else ''}, threads "
                 f"{setup['threads']}, load average {setup['load_average_1min'][0]:.1f} -> "
                 f"{setup['load_average_1min'][1]:.1f}, keep ratio {setup['keep_ratio']}, batch {setup['batch_size']}")
    return "\n".join(lines)
