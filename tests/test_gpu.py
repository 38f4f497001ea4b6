"""On a CUDA device (`make gpu-check` runs these with `pytest -m gpu`): the kernels against the eager
reference on the real WRN-28-4 site shapes, bf16 autocast and channels_last training with and without
kernels, a compiled model through a keep-ratio schedule, training steps that never wait for the device
and resume (bf16, and fp16 with its loss scaler), the determinism of tau, and the cluster nodes' GPU check."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from sparsedist.models import WideResNet
from sparsedist.sparsity import ActivationSparsity, ops
from sparsedist.sparsity.layer import top_k_mask
from sparsedist.sparsity.threshold import HISTOGRAM_BINS, KEPT_BINS, bit_histogram, histogram_origin, zero_below
from sparsedist.train.checkpoint import load_checkpoint, save_checkpoint
from sparsedist.train.loop import train
from tests.helpers import loaders_for, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# (C, H, W) of the WRN-28-4 sites on 32x32 images: the first site, then each group's width.
SITE_SHAPES = [(16, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]


@pytest.fixture(autouse=True)
def deterministic_convolutions():
    # Equal runs must give equal numbers: cuDNN may otherwise pick a different or atomic algorithm.
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_cuda_select_what_the_cpu_reference_selects_on_the_real_site_shapes(dtype, layout):
    for shape in SITE_SHAPES:
        x = torch.relu(torch.randn(8, *shape, generator=torch.Generator().manual_seed(shape[0]))).to(dtype)
        on_gpu = x.to(CUDA).contiguous(memory_format=layout)
        for keep_ratio in (0.01, 0.1, 0.5):
            mask = ops.top_k_mask(on_gpu, torch.tensor(keep_ratio, dtype=torch.float64, device=CUDA), True)
            assert mask.is_contiguous(memory_format=layout)
            assert torch.equal(mask.cpu(), top_k_mask(x, max(1, int(keep_ratio * x[0].numel()))))
        threshold = 1.0  # keeps about 16% of relu(randn)
        counts = torch.zeros(HISTOGRAM_BINS + 2, dtype=torch.int64, device=CUDA)
        y = ops.zero_below_counting(on_gpu, torch.tensor(threshold, device=CUDA), counts, HISTOGRAM_BINS,
                                    HISTOGRAM_BINS + 1, True, True)
        histogram = bit_histogram(x, histogram_origin(threshold))
        assert torch.equal(y.cpu(), zero_below(x, threshold))
        assert torch.equal(counts[:HISTOGRAM_BINS].cpu(), histogram)
        assert counts[HISTOGRAM_BINS:].tolist() == [histogram[:KEPT_BINS].sum().item(), x.numel()]


def bf16_training_record(scope: str, use_kernels: bool, compile_mode: str | None = None,
                         steps_context=contextlib.nullcontext) -> tuple[list, ActivationSparsity]:
    """Logits, gradients, statistics and tau of 4 bf16-autocast, channels_last steps through rho 1 -> 0.05.

    The steps run inside `steps_context()` and read nothing off the device; the record is read after."""
    sparsity = ActivationSparsity(scope, keep_ratio=1.0, use_kernels=use_kernels)
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2, make_site=sparsity.new_site).to(CUDA, memory_format=torch.channels_last)
    sparsity.to(CUDA)
    trained = torch.compile(model, mode=compile_mode) if compile_mode else model
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(CUDA, memory_format=torch.channels_last)
    on_device = []
    with steps_context():
        for keep_ratio in (0.5, 0.2, 0.1, 0.05):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = trained(images)
            logits.float().square().mean().backward()
            stats = sparsity.finish_step()
            sparsity.set_keep_ratio(keep_ratio)
            # Cloned: a CUDA graph replay (reduce-overhead) reuses its output's memory.
            on_device.append((logits.detach().clone(), [p.grad.clone() for p in model.parameters()], stats,
                              sparsity.threshold_tensor.clone()))
    record = [(logits.cpu(), [grad.cpu() for grad in grads], (stats.realized_keep, stats.site_density, stats.threshold),
               tau.item()) for logits, grads, stats, tau in on_device]
    return record, sparsity


@contextlib.contextmanager
def raising_on_device_syncs():
    torch.cuda.set_sync_debug_mode("error")  # any device -> host synchronization raises
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_bf16_channels_last_training_is_bitwise_alike_with_kernels_and_with_the_eager_path(scope):
    kernel_run, sparsity = bf16_training_record(scope, use_kernels=True)
    eager_run, _ = bf16_training_record(scope, use_kernels=False)
    for (logits, grads, stats, tau), (logits_e, grads_e, stats_e, tau_e) in zip(kernel_run, eager_run):
        assert torch.equal(logits, logits_e) and all(torch.equal(a, b) for a, b in zip(grads, grads_e))
        assert stats == stats_e and tau == tau_e
    assert kernel_run[-1][2][0] < 0.15  # the last steps ran sparse (realized keep ratio)


def test_tau_is_deterministic_across_identical_cuda_runs():
    first, second = (bf16_training_record("network", use_kernels=True)[0] for _ in range(2))
    assert [tau for *_, tau in first] == [tau for *_, tau in second]
    assert all(tau > 0 for *_, tau in first[1:])


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: train.compile_mode
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_a_compiled_cuda_model_follows_the_keep_ratio_schedule_on_one_compilation(scope, mode):
    torch._dynamo.reset()
    counters.clear()
    # reduce-overhead: a step whose graphs inductor would skip (a mutated input without a static address,
    # say) raises instead of running without them.
    with torch._inductor.config.patch({"triton.cudagraph_or_error": mode == "reduce-overhead"}):
        compiled, sparsity = bf16_training_record(scope, use_kernels=True, compile_mode=mode)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert compiled[-1][2][0] < 0.15


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_the_sparsity_part_of_a_cuda_step_never_waits_for_the_device(scope):
    bf16_training_record(scope, use_kernels=True)  # compiles the kernels outside the checked steps
    record, sparsity = bf16_training_record(scope, use_kernels=True, steps_context=raising_on_device_syncs)
    assert record[-1][2][0] < 0.15 and (scope == "layer" or record[-1][3] > 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: the loss scaler lives on the device too
def test_training_steps_on_cuda_never_wait_for_the_device(precision):
    def synchronizations(steps: int) -> int:
        cfg = tiny_config("sparsity.scope=network", "train.epochs=1", "train.batch_size=32", "train.log_every_steps=1",
                          f"train.max_steps_per_epoch={steps}", "controller.interval=2", "eval.keep_ratios=[1.0]",
                          "controller.warmup_epochs=0.5",  # dense steps too (tau 0.0), as many as half the steps
                          f"train.precision={precision}", "train.channels_last=true")
        train(cfg, loaders_for(cfg, device=CUDA), device=CUDA)  # kernels compiled, first-use checks done
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # a warning per synchronizing call (event waits are not)
            try:
                train(cfg, loaders_for(cfg, device=CUDA), device=CUDA)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)

    # The epoch's end (evaluation, records) synchronizes a fixed number of times; steps add none.
    assert synchronizations(7) == synchronizations(3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: the loss scale is in the checkpoint
def test_resume_on_cuda_continues_the_identical_trajectory(tmp_path, precision):
    cfg = tiny_config("sparsity.scope=network", "train.epochs=4", "train.batch_size=32", "controller.interval=2",
                      "controller.tighten_pct=0.3", "eval.keep_ratios=[1.0, 0.3]", "sparsity.calibration_batches=1",
                      f"train.precision={precision}", "train.channels_last=true")
    straight = train(cfg, loaders_for(cfg, device=CUDA), device=CUDA)

    def save_epoch_1_and_stop(end):
        if end.epoch == 1:
            save_checkpoint(end.state(), str(tmp_path / "epoch_00001"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, loaders_for(cfg, device=CUDA), device=CUDA, on_epoch_end=save_epoch_1_and_stop)
    resumed = train(cfg, loaders_for(cfg, device=CUDA), device=CUDA,
                    resume_state=load_checkpoint(str(tmp_path / "epoch_00001")))
    assert resumed.trajectory == straight.trajectory[len(straight.trajectory) // 2:]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.sparsity.threshold == straight.sparsity.threshold > 0


def test_the_node_check_sees_the_gpu_and_runs_an_nccl_all_reduce():
    # cluster/check-node.py --gpu's part, as each GPU worker of the launcher configs runs it before Ray starts
    # (in its own process: it makes and ends a default process group).
    path = Path(__file__).resolve().parents[1] / "cluster" / "check-node.py"
    done = subprocess.run([sys.executable, "-c", "import runpy, sys; print(runpy.run_path(sys.argv[1])['check_gpu']())",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("all-reduce ok"), done.stderr
