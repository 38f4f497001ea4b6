"""`sparsedist bench inference EXPORT_DIR`: what each regime of an exported model costs on this CPU.

Per regime: the measured input density of every convolution (and the head) on test images, the
multiply-adds it needs (dense MACs x input density), and CPU latency at batch 1 and 64 (median of
`repeats` after warm-up) for three execution paths:

- dense: the model at rho = 1 (no sparsity sites at work), one baseline for every regime;
- masked: the model at rho, as trained: zeros are computed like any other value;
- skip-zeros: the same, but every stride-1 "same" convolution whose input is at most
  `SPARSE_BELOW` nonzero multiplies only the nonzero inputs (`SkipZerosConv2d`).

The paths take turns inside every repeat, so a change in machine load hits all of them alike; the
load average before and after is recorded.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sparsedist.bench import median_latencies, run_benchmark
from sparsedist.export.load import SparseModel, load_model

# torch warns once per process that sparse CSR support is beta; the path below is measured, not trusted blindly.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

SPARSE_BELOW = 0.2  # input density at or under which SkipZerosConv2d multiplies nonzeros only
BATCH_SIZES = (1, 64)
PATHS = ("dense", "masked", "skip_zeros")


class SkipZerosConv2d(nn.Module):
    """A stride-1, zero-padded "same" convolution computed from its nonzero inputs only.

    Each nonzero input pixel spreads its channels to the k x k outputs around it: the input as a
    CSR matrix (pixels x channels) times the tap-flipped weights (channels x out_channels*k*k) gives
    every nonzero's contributions (MKL sparse x dense, nnz x out_channels*k*k multiply-adds), and
    F.fold sums them into place. Denser inputs go to the wrapped convolution.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        in_channels = conv.weight.shape[1]
        spread = conv.weight.detach().flip(2, 3).transpose(0, 1).reshape(in_channels, -1)
        self.register_buffer("spread", spread.contiguous(), persistent=False)

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        same_padding = all(p == k // 2 and k % 2 for p, k in zip(conv.padding, conv.kernel_size))
        return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
                and conv.padding_mode == "zeros" and same_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.count_nonzero(x) > SPARSE_BELOW * x.numel():
            return self.conv(x)
        batch, channels, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, channels).to_sparse_csr()
        contributions = (pixels @ self.spread).view(batch, height * width, -1).transpose(1, 2)
        return F.fold(contributions, (height, width), self.conv.kernel_size, padding=self.conv.padding)


def skipping_zeros(model: SparseModel) -> SparseModel:
    """A copy of `model` whose eligible convolutions skip zero inputs (same weights, same regime)."""
    model = copy.deepcopy(model)
    for name, module in list(model.network.named_modules()):
        if isinstance(module, nn.Conv2d) and SkipZerosConv2d.supports(module):
            parent, _, child = name.rpartition(".")
            setattr(model.network.get_submodule(parent), child, SkipZerosConv2d(module))
    return model


def layer_costs(model: SparseModel, images: torch.Tensor) -> list[dict]:
    """Per convolution (and the head): dense MACs per image, measured input density, effective MACs."""
    costs, hooks = [], []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            x = inputs[0]
            per_output = module.weight[0].numel()  # in_channels / groups * kernel area, or in_features
            dense = output[0].numel() * per_output
            density = torch.count_nonzero(x).item() / x.numel()
            costs.append({"name": name, "dense_macs": dense, "input_density": density, "effective_macs": dense * density})
        return hook

    for name, module in model.network.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return costs


def sample_images(model: SparseModel, count: int) -> torch.Tensor:
    """`count` raw test images of the export's dataset (uint8 N x C x H x W), cycled if the split is smaller."""
    from sparsedist.config import Config
    from sparsedist.data.sources import load_source

    data_cfg = Config.model_validate(model.config["provenance"]["config"]).data
    images = torch.from_numpy(load_source(data_cfg, log=lambda line: None).test_images).permute(0, 3, 1, 2)
    return images[torch.arange(count) % len(images)].contiguous()


def measure(export_dir: str, repeats: int, warmup: int) -> dict:
    load_before = os.getloadavg()[0]
    model = load_model(export_dir)
    dense, sparse = copy.deepcopy(model), skipping_zeros(model)
    images = sample_images(model, max(BATCH_SIZES))
    batches = {size: images[:size] for size in BATCH_SIZES}
    regimes = []
    for regime in model.config["regimes"]:
        keep_ratio = regime["keep_ratio"]
        model.set_keep_ratio(keep_ratio)
        sparse.set_keep_ratio(keep_ratio)
        costs = layer_costs(model, images)
        latency = {path: {} for path in PATHS}
        for size, batch in batches.items():
            # Dense is timed in every regime, beside the others, so each ratio shares the load of its moment.
            timed = median_latencies({"dense": lambda b=batch: dense(b), "masked": lambda b=batch: model(b),
                                      "skip_zeros": lambda b=batch: sparse(b)}, repeats, warmup)
            for path in PATHS:
                latency[path][str(size)] = timed[path]
        with torch.no_grad():
            agreement = (sparse(images).argmax(1) == model(images).argmax(1)).float().mean().item()
        dense_macs = sum(cost["dense_macs"] for cost in costs)
        effective_macs = sum(cost["effective_macs"] for cost in costs)
        regimes.append({
            "keep_ratio": keep_ratio, "accuracy": regime["accuracy"], "layers": costs,
            "dense_macs": dense_macs, "effective_macs": effective_macs, "mac_reduction": dense_macs / effective_macs,
            "latency_ms": latency,
            "speedup": {path: {size: latency["dense"][size] / latency[path][size] for size in latency[path]}
                        for path in PATHS if path != "dense"},
            "skip_zeros_same_prediction": agreement,
        })
    model_cfg = model.config["model"]
    return {
        "setup": {"export": os.path.abspath(export_dir), "model": f"WRN-{model_cfg['depth']}-{model_cfg['widen_factor']}",
                  "scope": model.scope, "input": model.config["input"], "images": f"test split of {model.config['provenance']['dataset']}",
                  "batch_sizes": list(BATCH_SIZES), "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                  "sparse_below": SPARSE_BELOW, "device": "cpu", "dtype": "float32",
                  "load_average_1min": [load_before, os.getloadavg()[0]]},
        "regimes": regimes,
    }


def format_table(result: dict) -> str:
    setup = result["setup"]
    header = (f"{'keep':>6} {'test acc':>8} {'MMACs':>8} {'x fewer':>7}" +
              "".join(f" {path + ' b' + str(size):>14}" for size in setup["batch_sizes"] for path in PATHS) +
              "".join(f" {'x b' + str(size) + ' skip':>10}" for size in setup["batch_sizes"]))
    lines = [f"{setup['model']} ({setup['scope']} scope), {setup['images']}; latency in ms, median of {setup['repeats']}",
             header]
    for regime in result["regimes"]:
        accuracy = regime["accuracy"].get("test", float("nan"))
        line = (f"{regime['keep_ratio']:>6g} {accuracy:>8.4f} {regime['effective_macs'] / 1e6:>8.2f} "
                f"{regime['mac_reduction']:>7.2f}")
        line += "".join(f" {regime['latency_ms'][path][str(size)]:>14.3f}" for size in setup["batch_sizes"] for path in PATHS)
        line += "".join(f" {regime['speedup']['skip_zeros'][str(size)]:>10.2f}" for size in setup["batch_sizes"])
        lines.append(line)
    lines.append(f"threads {setup['threads']}, load average {setup['load_average_1min'][0]:.1f} -> "
                 f"{setup['load_average_1min'][1]:.1f}; dense MMACs/image "
                 f"{result['regimes'][0]['dense_macs'] / 1e6:.2f}; skip-zeros below input density {setup['sparse_below']}")
    return "\n".join(lines)


def run_inference_benchmark(export_dir: str, repeats: int = 20, warmup: int = 3, threads: int | None = None,
                            json_out: str | None = None) -> dict:
    """Measure every regime of the exported model in `export_dir`; print the table, maybe write JSON.

    Returns {"setup": {...}, "regimes": [{keep_ratio, accuracy, layers: [{name, dense_macs, input_density,
    effective_macs}], dense_macs, effective_macs, mac_reduction, latency_ms: {path: {batch: ms}},
    speedup: {masked|skip_zeros: {batch: dense ms / ms}}, skip_zeros_same_prediction}]}; MACs per image.
    """
    return run_benchmark(lambda: measure(export_dir, repeats, warmup), format_table, threads=threads, json_out=json_out)
