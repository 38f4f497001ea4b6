"""Pre-activation Wide ResNet with per-pixel RMSNorm and a sparsity site after every hidden ReLU.

The model knows nothing about top-k: it calls `make_site(name)` once per site and applies the
returned module right after the ReLU (norm -> ReLU -> site -> conv). WRN-d-k has 3 * (d-4)/6
blocks with two sites each, plus one before global pooling: 25 sites for WRN-28-4.

The defaults are the released script's network exactly (5,849,050 parameters for WRN-28-4): RMSNorm
with a learned gain and bias (eps 1e-8), projection shortcuts that read the raw block input, dropout
(if any) right after the first convolution, and a kaiming-normal (linear) classifier with a zero bias.
`norm_bias`, `norm_output`, `shortcut` and `head_init` name the alternatives.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

SiteFactory = Callable[[str], nn.Module]
ShortcutInput = Literal["raw", "activated"]
NormOutput = Literal["promoted", "input"]
HeadInit = Literal["kaiming", "torch"]


def identity_site(name: str) -> nn.Module:
    return nn.Identity()


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of every pixel with a learned per-channel gain and, optionally, bias
    (no batch statistics, so a replica's output never depends on the other samples)."""

    def __init__(self, channels: int, eps: float = 1e-8, bias: bool = True, output: NormOutput = "promoted"):
        super().__init__()
        self.eps = eps
        self.output = output
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the autocast dtype: eps 1e-8 underflows in bf16.
        x32 = x.float()
        # promoted: the dtype type promotion gives the released script's norm, whose fp32 statistics meet
        # the input and the parameters: fp32 under autocast (parameters stay fp32), so the ReLU and the
        # top-k after it run in fp32 too; a model cast to bf16 without autocast stays bf16.
        dtype = torch.promote_types(x.dtype, self.weight.dtype) if self.output == "promoted" else x.dtype
        normalized = (x32 * torch.rsqrt(x32.pow(2).mean(dim=1, keepdim=True) + self.eps)).to(dtype)
        out = normalized * self.weight.view(1, -1, 1, 1).to(dtype)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1).to(dtype)


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, eps: float, norm_bias: bool,
                 norm_output: NormOutput, shortcut: ShortcutInput, make_site: SiteFactory, name: str):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_ch, eps, norm_bias, norm_output)
        self.site1 = make_site(f"{name}.site1")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = ChannelRMSNorm(out_ch, eps, norm_bias, norm_output)
        self.site2 = make_site(f"{name}.site2")
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False) if needs_projection else None
        self.shortcut_input = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.site1(F.relu(self.norm1(x)))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.shortcut_input == "raw" else activated)
        out = self.dropout(self.conv1(activated))
        out = self.conv2(self.site2(F.relu(self.norm2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 4,
        dropout: float = 0.0,
        in_channels: int = 3,
        num_classes: int = 10,
        norm_eps: float = 1e-8,
        norm_bias: bool = True,
        norm_output: NormOutput = "promoted",
        shortcut: ShortcutInput = "raw",
        head_init: HeadInit = "kaiming",
        make_site: SiteFactory = identity_site,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth - 4 must be divisible by 6, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        in_ch = widths[0]
        for group, (out_ch, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for index in range(blocks_per_group):
                name = f"group{group}.block{index}"
                blocks.append(PreActBlock(in_ch, out_ch, stride if index == 0 else 1, dropout, norm_eps, norm_bias,
                                          norm_output, shortcut, make_site, name))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.final_norm = ChannelRMSNorm(in_ch, norm_eps, norm_bias, norm_output)
        self.final_site = make_site("final.site")
        self.head = nn.Linear(in_ch, num_classes)
        self._init_weights(head_init)

    def _init_weights(self, head_init: HeadInit) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if head_init == "kaiming":
            nn.init.kaiming_normal_(self.head.weight, nonlinearity="linear")
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.groups(self.stem(x))
        out = self.final_site(F.relu(self.final_norm(out)))
        return self.head(out.mean(dim=(2, 3)))


def build_model(model_cfg, in_channels: int, num_classes: int, make_site: SiteFactory = identity_site) -> WideResNet:
    """Build the configured backbone (`model_cfg` is a `sparsedist.config.ModelConfig`)."""
    return WideResNet(
        depth=model_cfg.depth,
        widen_factor=model_cfg.widen_factor,
        dropout=model_cfg.dropout,
        in_channels=in_channels,
        num_classes=num_classes,
        norm_eps=model_cfg.norm_eps,
        norm_bias=model_cfg.norm_bias,
        norm_output=model_cfg.norm_output,
        shortcut=model_cfg.shortcut,
        head_init=model_cfg.head_init,
        make_site=make_site,
    )
