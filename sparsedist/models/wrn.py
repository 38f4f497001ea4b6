"""Pre-activation Wide ResNet with per-pixel RMSNorm and a sparsity site after every hidden ReLU.

The model knows nothing about top-k: it calls `make_site(name)` once per site and applies the
returned module right after the ReLU (norm -> ReLU -> site -> conv). WRN-d-k has 3 * (d-4)/6
blocks with two sites each, plus one before global pooling: 25 sites for WRN-28-4.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

SiteFactory = Callable[[str], nn.Module]


def identity_site(name: str) -> nn.Module:
    return nn.Identity()


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of every pixel with a learned per-channel gain (no batch statistics)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps)
        return (x.float() * rms).to(x.dtype) * self.weight.view(1, -1, 1, 1).to(x.dtype)


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, eps: float, make_site: SiteFactory, name: str):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_ch, eps)
        self.site1 = make_site(f"{name}.site1")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm2 = ChannelRMSNorm(out_ch, eps)
        self.site2 = make_site(f"{name}.site2")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.site1(F.relu(self.norm1(x)))
        # The projection shortcut reads the normalized, activated input (standard pre-activation WRN).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.site2(F.relu(self.norm2(out)))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 4,
        dropout: float = 0.0,
        in_channels: int = 3,
        num_classes: int = 10,
        norm_eps: float = 1e-6,
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
                blocks.append(PreActBlock(in_ch, out_ch, stride if index == 0 else 1, dropout, norm_eps, make_site, name))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.final_norm = ChannelRMSNorm(in_ch, norm_eps)
        self.final_site = make_site("final.site")
        self.head = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

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
        make_site=make_site,
    )
