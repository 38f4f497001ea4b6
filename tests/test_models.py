"""The backbone: the paper presets are the released script's network exactly; the alternatives are options."""

import pytest
import torch

from sparsedist.config import load_config, preset_names
from sparsedist.models import build_model
from sparsedist.models.wrn import ChannelRMSNorm

PAPER_PRESETS = [name for name in preset_names() if name.startswith(("paper-", "network-"))]


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_build_the_released_wrn_28_4(preset):
    cfg = load_config(preset)
    assert (cfg.model.norm_bias, cfg.model.shortcut, cfg.model.head_init, cfg.model.norm_eps) == (True, "raw", "kaiming", 1e-8)
    # The released script's count; without the 3,600 RMSNorm biases it would be 5,845,450.
    assert parameter_count(build_model(cfg.model, 3, 10)) == 5_849_050


def test_norm_bias_option_removes_exactly_the_biases():
    cfg = load_config("paper-dense", ["model.norm_bias=false"])
    assert parameter_count(build_model(cfg.model, 3, 10)) == 5_849_050 - 3_600


def test_rmsnorm_is_per_pixel_over_channels_with_gain_and_bias():
    norm = ChannelRMSNorm(4, eps=1e-8)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    x = torch.randn(2, 4, 3, 5)
    expected = x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def shortcut_inputs(model, images):
    """(block input, site1 output, projection input) for every block with a projection shortcut."""
    seen = []
    for block in (b for group in model.groups for b in group if b.shortcut is not None):
        captured = {}
        block.register_forward_pre_hook(lambda m, args, c=captured: c.__setitem__("block", args[0]))
        block.site1.register_forward_hook(lambda m, args, out, c=captured: c.__setitem__("site", out))
        block.shortcut.register_forward_pre_hook(lambda m, args, c=captured: c.__setitem__("shortcut", args[0]))
        seen.append(captured)
    model(images)
    return [(c["block"], c["site"], c["shortcut"]) for c in seen]


@pytest.mark.parametrize("shortcut", ["raw", "activated"])
def test_projection_shortcut_reads_the_configured_input(shortcut):
    cfg = load_config("smoke", [f"model.shortcut={shortcut}"])
    inputs = shortcut_inputs(build_model(cfg.model, 3, 4), torch.randn(2, 3, 16, 16))
    assert len(inputs) == 2  # WRN-10-1: the first block of groups 2 and 3 changes width and stride
    for block_input, site_output, projection_input in inputs:
        expected = block_input if shortcut == "raw" else site_output
        other = site_output if shortcut == "raw" else block_input
        assert projection_input is expected and not torch.equal(projection_input, other)


@pytest.mark.parametrize("head_init, std", [("kaiming", 1 / 16), ("torch", 1 / 16 / 3**0.5)])
def test_classifier_initialization(head_init, std):
    torch.manual_seed(0)
    cfg = load_config("paper-dense", [f"model.head_init={head_init}"])
    head = build_model(cfg.model, 3, 10).head  # 256 inputs: kaiming-normal std 1/16, PyTorch's uniform 1/16/sqrt(3)
    assert head.weight.std().item() == pytest.approx(std, rel=0.08)
    assert torch.count_nonzero(head.bias) == 0
