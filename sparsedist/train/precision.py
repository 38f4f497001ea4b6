"""Mixed precision: the autocast of a phase (training, evaluation) and fp16's dynamic loss scaling."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> ContextManager:
    """bf16/fp16 autocast on CUDA; CPU computes in fp32 (fp16 convolutions run 12-17x slower there, and the
    paper's precision is a GPU setting: docs/performance.md)."""
    if precision in AUTOCAST_DTYPES and device.type == "cuda":
        return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's rule, kept on the device so no step waits for it.

    The loss is multiplied by `scale` before backward and the gradients divided by it after. A step whose
    gradients are not finite is skipped (the loop's all-reduced flag, so every replica skips alike) and
    halves the scale; `growth_interval` finite steps in a row double it.
    """

    GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0, 0.5, 2000  # GradScaler's defaults

    def __init__(self, init_scale: float, device: torch.device):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, gradients: list[torch.Tensor]) -> None:
        # The reciprocal in float64 then rounded, as GradScaler computes it.
        torch._foreach_mul_(gradients, self.scale.double().reciprocal().float())

    def update(self, overflow: torch.Tensor) -> None:
        """After a step: `overflow` (bool on the device) halves the scale and restarts the count."""
        streak = torch.where(overflow, 0, self.growth_tracker + 1)
        grow = streak >= self.GROWTH_INTERVAL
        self.scale.copy_(torch.where(overflow, self.scale * self.BACKOFF_FACTOR,
                                     torch.where(grow, self.scale * self.GROWTH_FACTOR, self.scale)))
        self.growth_tracker.copy_(torch.where(grow, 0, streak))

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.item(), "growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])
