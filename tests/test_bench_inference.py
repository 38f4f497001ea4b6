"""`sparsedist bench inference` on a real export: MAC accounting, measured densities, the skip-zeros convolution."""

import json
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from matplotlib.image import imread
from torch.utils.flop_counter import FlopCounterMode

from sparsedist.bench.inference import SkipZerosConv2d, layer_costs, sample_images, skipping_zeros
from sparsedist.cli import main
from sparsedist.export.load import load_model
from sparsedist.report.figures import plot_inference_cost
from sparsedist.sparsity.layer import kept_per_sample
from tests.export_helpers import KEEP_RATIOS, train_run

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench"))
    out = os.path.join(root, "model")
    assert main(["export", train_run(root, "layer"), "--out", out]) == 0
    return out


@pytest.mark.parametrize("kernel, channels", [(3, 8), (1, 8), (5, 3)])
def test_skip_zeros_convolution_equals_the_dense_one_on_sparse_input(kernel, channels):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 6, kernel, padding=kernel // 2, bias=False)
    x = torch.relu(torch.randn(2, channels, 9, 7)) * (torch.rand(2, channels, 9, 7) < 0.1)
    with torch.no_grad():
        torch.testing.assert_close(SkipZerosConv2d(conv)(x), F.conv2d(x, conv.weight, padding=kernel // 2),
                                   rtol=1e-5, atol=1e-6)
        dense_input = torch.rand(2, channels, 9, 7) + 0.1
        assert torch.equal(SkipZerosConv2d(conv)(dense_input), conv(dense_input))  # denser inputs: the conv itself


def test_only_stride_one_same_convolutions_skip_zeros():
    assert SkipZerosConv2d.supports(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    assert not SkipZerosConv2d.supports(nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False))
    assert not SkipZerosConv2d.supports(nn.Conv2d(4, 4, 3, padding=0, bias=False))
    assert not SkipZerosConv2d.supports(nn.Conv2d(4, 4, 3, padding=1, bias=True))


def test_mac_accounting_matches_torch_flop_counter_and_site_densities_are_exact(export_dir):
    model = load_model(export_dir)
    images = sample_images(model, 8)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    dense = layer_costs(model, images)
    assert sum(cost["dense_macs"] for cost in dense) * 2 * len(images) == counter.get_total_flops()
    model.set_keep_ratio(0.05)
    values_per_sample = {}
    for name, module in model.network.named_modules():
        if name.endswith(("conv1", "conv2")):  # the convolutions that read a sparsity site
            module.register_forward_pre_hook(lambda m, inputs, name=name: values_per_sample.update({name: inputs[0][0].numel()}))
    costs = {cost["name"]: cost for cost in layer_costs(model, images)}
    assert len(values_per_sample) == 6  # WRN-10-1: 3 blocks, two sites each
    for name, values in values_per_sample.items():  # layer scope keeps exactly k of every sample's map
        assert costs[name]["input_density"] == kept_per_sample(values, 0.05) / values, name
    for cost in costs.values():
        assert cost["effective_macs"] == cost["dense_macs"] * cost["input_density"]


def test_skip_zeros_model_predicts_like_the_masked_one(export_dir):
    model = load_model(export_dir, keep_ratio=0.05)
    sparse = skipping_zeros(model)
    images = sample_images(model, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images), rtol=1e-4, atol=1e-4)
    assert any(isinstance(module, SkipZerosConv2d) for module in sparse.network.modules())
    assert not any(isinstance(module, SkipZerosConv2d) for module in model.network.modules())  # a copy


def test_bench_inference_command_writes_every_regime(export_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "inference", export_dir, "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [regime["keep_ratio"] for regime in result["regimes"]] == KEEP_RATIOS
    assert len(result["setup"]["load_average_1min"]) == 2 and result["setup"]["threads"] == 1
    for regime in result["regimes"]:
        assert set(regime["latency_ms"]) == {"dense", "masked", "skip_zeros"}
        assert all(set(times) == {"1", "64"} and min(times.values()) > 0 for times in regime["latency_ms"].values())
        assert regime["mac_reduction"] == pytest.approx(regime["dense_macs"] / regime["effective_macs"])
    assert result["regimes"][-1]["mac_reduction"] > 5  # rho = 0.05 (the stem and raw-input shortcuts stay dense)
    table = capsys.readouterr().out
    assert "WRN-10-1 (layer scope)" in table and "skip_zeros b1" in table
    plot_inference_cost(result, str(tmp_path / "cost.png"))  # what `sparsedist report --bench-json` draws
    image = imread(tmp_path / "cost.png")
    assert image.shape[1] > 600 and float(image[..., :3].std()) > 0.05


def test_bench_inference_refuses_a_directory_that_is_no_export(tmp_path, capsys):
    assert main(["bench", "inference", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
