"""Device -> host reads per training step, counted: a step reads nothing off the device. Its numbers
(loss, accuracy, the non-finite flag, the sparsity statistics) leave in one asynchronous copy that
the host reads a step later, or at once when the controller may change rho after that step. On CPU
the reads are counted by wrapping every tensor method that copies to the host; on CUDA,
`torch.cuda.set_sync_debug_mode` checks the sparsity part and the loop (tests/test_gpu.py)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

import sparsedist
from sparsedist.models import WideResNet
from sparsedist.sparsity import ActivationSparsity
from sparsedist.train.host_copy import HostCopies
from sparsedist.train.loop import train
from tests.helpers import loaders_for, tiny_config

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
PACKAGE = os.path.dirname(sparsedist.__file__)


def from_the_sparsity_package(frame) -> bool:
    """The read is called by sparsity code itself (not by Triton's interpreter running a kernel)."""
    return frame.f_code.co_filename.startswith(os.path.join(PACKAGE, "sparsity"))


def from_a_step_outside_the_cpu_site_path(frame) -> bool:
    """The read happens under our code, but not in a site's CPU path (`apply_site` without kernels
    reads tau and a tie flag on the host by design; on CUDA the kernels replace it)."""
    ours = False
    while frame is not None:
        if frame.f_code.co_name == "apply_site":
            return False
        ours = ours or frame.f_code.co_filename.startswith(PACKAGE)
        frame = frame.f_back
    return ours


@contextlib.contextmanager
def counting_host_reads(counts):
    """Lists the host reads whose calling frame satisfies `counts`."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        original = originals[name]

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if counts(caller):
                reads.append(f"{name} in {os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_the_sparsity_part_of_a_step_reads_nothing_off_the_device(scope):
    # The device path (the kernels, here in Triton's interpreter): sites, statistics, tau, a new rho.
    sparsity = ActivationSparsity(scope, keep_ratio=1.0, use_kernels=True)
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=1, make_site=sparsity.new_site)
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with counting_host_reads(from_the_sparsity_package) as reads:
        for keep_ratio in (0.5, 0.2, 0.1):
            model(images).square().mean().backward()
            stats = sparsity.finish_step()
            sparsity.set_keep_ratio(keep_ratio)
    assert reads == []
    assert 0 < stats.realized_keep <= 0.5 and (scope == "layer" or sparsity.threshold > 0)  # reading is allowed


@pytest.mark.parametrize("controller", [("controller.strategy=fixed", "controller.keep_ratio=0.3"),
                                        ("controller.strategy=adaptive", "controller.interval=2")])
def test_a_training_step_reads_nothing_off_the_device(controller):
    def loop_reads(steps: int) -> int:
        cfg = tiny_config("sparsity.scope=network", "train.epochs=1", "train.batch_size=32", "train.log_every_steps=100",
                          f"train.max_steps_per_epoch={steps}", *controller, "eval.keep_ratios=[1.0]")
        with counting_host_reads(from_a_step_outside_the_cpu_site_path) as reads:
            train(cfg, loaders_for(cfg), device=torch.device("cpu"))
        return len(reads)

    # The epoch's end (record, evaluation) reads a fixed number of times; steps add none.
    assert loop_reads(7) == loop_reads(3)


def test_host_copies_refuse_a_slot_reused_before_it_was_received():
    copies = HostCopies(2, torch.device("cpu"))
    first = copies.send(torch.tensor([1.0, 2.0], dtype=torch.float64))
    copies.send(torch.tensor([3.0, 4.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="reused before it was received"):
        copies.send(torch.tensor([5.0, 6.0], dtype=torch.float64))
    assert copies.receive(first) == [1.0, 2.0]
    assert copies.receive(copies.send(torch.tensor([5.0, 6.0], dtype=torch.float64))) == [5.0, 6.0]
