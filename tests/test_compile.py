"""train.compile: the model and its sparsity sites compile once, whatever rho and tau do (CPU inductor)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from sparsedist.logging import JsonLinesSink, read_jsonl
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
