"""Small device tensors copied to host memory without making the host wait for the device."""

from __future__ import annotations

import torch


class HostCopies:
    """A ring of `slots` host buffers of `numel` float64 values each, allocated once.

    `send` starts copying a tensor into the next buffer and returns its slot at once (on a GPU the
    buffers are pinned and the copy is asynchronous, followed by a CUDA event); `receive` waits for
    that copy alone, not for work queued after it, and returns the values. A slot is reused `slots`
    sends later, so a caller receives each slot before sending that many more. The values are read
    through numpy views made here, so a received copy calls no tensor method at all.
    """

    def __init__(self, numel: int, device: torch.device, slots: int = 2):
        self._asynchronous = device.type == "cuda"
        self._buffers = [torch.empty(numel, dtype=torch.float64, pin_memory=self._asynchronous) for _ in range(slots)]
        self._arrays = [buffer.numpy() for buffer in self._buffers]
        self._events = [torch.cuda.Event() if self._asynchronous else None for _ in range(slots)]
        self._next = 0
        self._unreceived: set[int] = set()

    def send(self, values: torch.Tensor) -> int:
        slot = self._next
        if slot in self._unreceived:
            raise RuntimeError(f"host copy slot {slot} reused before it was received: receive each copy within "
                               f"{len(self._buffers)} sends")
        self._unreceived.add(slot)
        self._next = (slot + 1) % len(self._buffers)
        self._buffers[slot].copy_(values, non_blocking=self._asynchronous)
        if self._asynchronous:  # on the stream the copy was queued on: that of the values' device
            self._events[slot].record(torch.cuda.current_stream(values.device))
        return slot

    def receive(self, slot: int) -> list[float]:
        self._unreceived.discard(slot)
        if self._asynchronous:
            self._events[slot].synchronize()
        return self._arrays[slot].tolist()
