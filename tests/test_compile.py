"""train.compile: the model and its sparsity sites compile once, whatever rho and tau do (CPU inductor)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from sparsedist.logging import JsonLinesSink, read_jsonl
from sparsedist.sparsity import ActivationSparsity, ops
from sparsedist.sparsity.threshold import HISTOGRAM_BINS
from sparsedist.train.loop import train
from tests.helpers import loaders_for, tiny_config


# reduce-overhead (CUDA graphs on a GPU) compiles and trains the same on CPU, where it adds no graphs.
@pytest.mark.parametrize("scope, mode", [("layer", "default"), ("network", "reduce-overhead")])
def test_a_compiled_model_trains_through_a_keep_ratio_schedule_on_one_compilation(scope, mode, tmp_path):
    # A cyclic controller compressing by 30% every step: rho 1, 0.7, 0.49, ... (7 values in 7 steps).
    cfg = tiny_config(f"sparsity.scope={scope}", "train.compile=true", f"train.compile_mode={mode}",
                      "train.epochs=1", "train.batch_size=32",
                      "train.max_steps_per_epoch=7", "controller.strategy=cyclic", "controller.interval=1",
                      "controller.rate=0.3", "eval.keep_ratios=[1.0]")
    torch._dynamo.reset()
    counters.clear()
    sink = JsonLinesSink(str(tmp_path / "metrics.jsonl"))
    result = train(cfg, loaders_for(cfg), device=torch.device("cpu"), sinks=[sink])
    sink.close()
    assert len({step["keep_ratio"] for step in result.trajectory}) >= 5
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    # The compiled sites really followed rho (read from the device tensor, not a traced constant).
    steps = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if r["kind"] == "step"]
    final = steps[-1]
    assert final["keep_ratio"] < 0.15
    if scope == "layer":
        assert final["realized_keep"] <= final["keep_ratio"]
    else:  # tau comes from the previous step's statistics at this rho
        assert final["threshold"] > 0 and final["realized_keep"] < 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", [False, True])  # True: the Triton kernels (here in the interpreter)
def test_each_custom_op_fake_gives_the_real_layout_for_a_channels_last_input_and_a_contiguous_gradient(use_kernel, dtype):
    x = torch.relu(torch.randn(2, 8, 4, 4)).to(dtype, memory_format=torch.channels_last)
    gradient, threshold = torch.randn(2, 8, 4, 4, dtype=dtype), torch.tensor(0.5)
    counts = torch.zeros(HISTOGRAM_BINS + 2, dtype=torch.int64)
    for op, args in ((ops.top_k_mask, (x, torch.tensor(0.25, dtype=torch.float64), use_kernel)),
                     (ops.zero_below_counting, (x, threshold, counts, HISTOGRAM_BINS, HISTOGRAM_BINS + 1, True, use_kernel)),
                     (ops.zero_below_backward, (gradient, x, threshold, use_kernel))):
        torch.library.opcheck(op, args, test_utils="test_faketensor")


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_a_compiled_channels_last_site_gets_the_eager_gradients(scope):
    # The GPU recipe's layout. The pooling's gradient reaches the site contiguous while its input is
    # channels_last, and inductor checks each custom op's output strides against its fake at run time.
    def gradients(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        sparsity = ActivationSparsity(scope, keep_ratio=0.5)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), sparsity.new_site("site"), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)
        step = torch.compile(model) if compiled else model
        images = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 4, (4,))
        found = []
        for _ in range(2):  # network scope: step 0 is dense, step 1 runs at the tau it chose
            model.zero_grad()
            F.cross_entropy(step(images), labels).backward()
            sparsity.finish_step()
            found.append(model[0].weight.grad.clone())
        return found

    torch._dynamo.reset()
    for compiled, eager in zip(gradients(compiled=True), gradients(compiled=False)):
        torch.testing.assert_close(compiled, eager)
