import math

import pytest
import torch

from sparsedist.config import regime_key
from sparsedist.controllers import build_controller
from sparsedist.logging import JsonLinesSink, progress_text, read_jsonl
from sparsedist.report.summary import regime_table, summarize
from sparsedist.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sparsedist.train.loop import NonFiniteLossError, build_optimizer, lr_factor, train
from tests.distributed import run_gloo
from tests.helpers import loaders_for, tiny_config

CPU = torch.device("cpu")
# Network scope and a fast adaptive controller, so tau, rho and controller state all change every epoch.
RESUME_OVERRIDES = ("sparsity.scope=network", "train.epochs=4", "train.batch_size=32", "controller.interval=2",
                    "controller.tighten_pct=0.3", "eval.keep_ratios=[1.0, 0.3]", "sparsity.calibration_batches=1")


def parameters(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_single_process_training_learns_and_writes_metrics(tmp_path):
    cfg = tiny_config("train.epochs=3", "train.batch_size=32")
    sink = JsonLinesSink(str(tmp_path / "metrics.jsonl"))
    train(cfg, loaders_for(cfg), device=CPU, sinks=[sink])
    sink.close()
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["eval"]["test"]["1.00"] >= 0.8, epochs[-1]
    assert set(epochs[-1]["eval"]) == {"val", "test"} and set(epochs[-1]["eval"]["val"]) == {"1.00", "0.50", "0.20"}
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 3 * 8 and all(0 < s["realized_keep"] <= 1 for s in steps)
    assert {"tighten"} <= {s["event"] for s in steps}, "the smoke controller should act within 24 steps"
    assert min(s["keep_ratio"] for s in steps) < 1.0
    assert len(steps[0]["density"]) == 7  # WRN-10-1: 3 blocks x 2 sites + the final site


def test_resume_continues_the_identical_trajectory(tmp_path):
    cfg = tiny_config(*RESUME_OVERRIDES)
    straight = train(cfg, loaders_for(cfg), device=CPU)

    def save_epoch_1_and_stop(end):
        if end.epoch == 1:
            save_checkpoint(end.state(), str(tmp_path / "epoch_00001"))
            raise KeyboardInterrupt  # stop the run here, as a killed job would

    with pytest.raises(KeyboardInterrupt):
        train(cfg, loaders_for(cfg), device=CPU, on_epoch_end=save_epoch_1_and_stop)
    first_half = len(straight.trajectory) // 2
    # Fresh loaders and model, as in a new process; the state comes back through a weights_only load.
    resumed = train(cfg, loaders_for(cfg), device=CPU, resume_state=load_checkpoint(str(tmp_path / "epoch_00001")))

    assert resumed.trajectory == straight.trajectory[first_half:]
    for name, value in parameters(straight.model).items():
        assert torch.equal(value, parameters(resumed.model)[name]), name
    assert resumed.sparsity.threshold == straight.sparsity.threshold
    assert resumed.final_record["eval"] == straight.final_record["eval"]
    assert any(t["event"] == "tighten" for t in straight.trajectory) and straight.sparsity.threshold > 0


def test_a_mid_epoch_checkpoint_resumes_at_the_next_batch_on_the_identical_trajectory(tmp_path):
    """A preemption notice in epoch 1 (asked every 3 batches): the checkpoint written at that step boundary,
    loaded as a new process would, continues exactly: steps, weights, tau and the epoch records."""
    cfg = tiny_config(*RESUME_OVERRIDES, "run.preemption_check_steps=3")
    straight_records = ListSink()
    straight = train(cfg, loaders_for(cfg), device=CPU, sinks=[straight_records])
    asked = []

    def notice_in_epoch_1() -> bool:
        asked.append(len(asked))
        return len(asked) == 3  # the first check of epoch 1 (8 batches an epoch: checks after batches 3 and 6)

    def save_and_stop(mid):
        save_checkpoint(mid.state(), str(tmp_path / "mid"))
        raise KeyboardInterrupt  # the host goes away after the checkpoint

    interrupted_records = ListSink()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, loaders_for(cfg), device=CPU, sinks=[interrupted_records], checkpoint_requested=notice_in_epoch_1,
              on_mid_epoch=save_and_stop)
    state = load_checkpoint(str(tmp_path / "mid"))
    assert (state["epoch"], state["partial_epoch"]["batches"]) == (0, 3)
    resumed_records = ListSink()
    resumed = train(cfg, loaders_for(cfg), device=CPU, sinks=[resumed_records], resume_state=state)

    steps_before = state["step"]
    assert steps_before == 8 + 3 and resumed.trajectory == straight.trajectory[steps_before:]
    for name, value in parameters(straight.model).items():
        assert torch.equal(value, parameters(resumed.model)[name]), name
    assert resumed.sparsity.threshold == straight.sparsity.threshold

    def timeless(records):
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_sec")} for r in records]

    # The records up to the checkpoint, then the resumed ones: the uninterrupted history, epoch 1's tally included.
    assert [(r["epoch"], r["batch"]) for r in interrupted_records if r["kind"] == "step"][-1] == (1, 3)
    assert timeless(list(interrupted_records) + resumed_records) == timeless(straight_records)
    # Its batches were cut for one replica: another world size is refused, not resumed on other examples.
    state["partial_epoch"]["world_size"] = 2
    with pytest.raises(CheckpointError, match="written mid-epoch by 2 workers"):
        train(cfg, loaders_for(cfg), device=CPU, resume_state=state)


class ListSink(list):
    def write(self, record):
        self.append(record)

    def close(self):
        pass


class PoisonedLoader:
    """Wraps a train loader, making the images of chosen global steps NaN."""

    def __init__(self, inner, poisoned_steps):
        self.inner, self.poisoned_steps, self.step = inner, set(poisoned_steps), 0

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for images, labels in self.inner:
            if self.step in self.poisoned_steps:
                images = torch.full_like(images, math.nan)
            self.step += 1
            yield images, labels


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_the_run(tmp_path):
    cfg = tiny_config("train.epochs=3", "train.batch_size=32", "train.max_nonfinite_steps=3")
    loaders = loaders_for(cfg)
    loaders.train = PoisonedLoader(loaders.train, poisoned_steps={2, 4})  # isolated bad steps: skipped
    records = ListSink()
    result = train(cfg, loaders, device=CPU, sinks=[records])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert [r["nonfinite_steps"] for r in records if r["kind"] == "epoch"] == [2, 0, 0]
    assert [r["step"] for r in records if r.get("event") == "nonfinite"] == [2, 3]  # optimizer steps so far
    assert len(result.trajectory) == 3 * 8 - 2

    checkpoints = tmp_path / "ckpt"
    loaders = loaders_for(cfg)
    loaders.train = PoisonedLoader(loaders.train, poisoned_steps={8 + 3, 8 + 4, 8 + 5})  # a streak in epoch 1

    def save(end):
        save_checkpoint(end.state(), str(checkpoints / f"epoch_{end.epoch:05d}"))

    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg, loaders, device=CPU, on_epoch_end=save)
    last_good = load_checkpoint(str(checkpoints / "epoch_00000"))
    assert last_good["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last_good["model"].values())


def test_a_step_skipped_on_the_device_changes_no_weight_and_a_later_first_step_is_exact():
    cfg = tiny_config()
    torch.manual_seed(0)
    skipping, fresh = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    fresh.load_state_dict(skipping.state_dict())
    skipping_optimizer, fresh_optimizer = build_optimizer(cfg, skipping), build_optimizer(cfg, fresh)
    before = {name: value.clone() for name, value in skipping.state_dict().items()}
    skipping(torch.full((2, 4), math.nan)).sum().backward()
    skipping_optimizer.found_inf.fill_(1.0)
    skipping_optimizer.step()
    assert all(torch.equal(before[name], value) for name, value in skipping.state_dict().items())
    skipping_optimizer.found_inf.fill_(0.0)
    inputs = torch.randn(2, 4)
    for model, optimizer in ((skipping, skipping_optimizer), (fresh, fresh_optimizer)):
        optimizer.zero_grad()
        model(inputs).square().sum().backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(skipping.parameters(), fresh.parameters()))
    momentum = [skipping_optimizer.state[p]["momentum_buffer"] for p in skipping.parameters()]
    assert all(torch.equal(buffer, p.grad + cfg.optim.weight_decay * before_p)
               for buffer, p, before_p in zip(momentum, skipping.parameters(), before.values()))


class SinkWatchingLoader:
    """Wraps a train loader; notes how many step records were written when each batch is fetched."""

    def __init__(self, inner, records):
        self.inner, self.records, self.written_at_fetch = inner, records, []

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.written_at_fetch.append(sum(r["kind"] == "step" for r in self.records))
            yield batch


def test_steps_are_read_a_step_late_except_before_a_decision_and_decide_exactly_as_read_at_once():
    cfg = tiny_config("train.epochs=2", "train.batch_size=32", "controller.interval=3", "controller.warmup_epochs=0.25",
                      "controller.tighten_pct=0.3", "controller.drop_tol=0.02", "sparsity.scope=network")
    loaders, records = loaders_for(cfg), ListSink()
    # Skipped steps: the last warm-up batch (1), a decision batch (4) and the one after it, a plain one.
    loaders.train = SinkWatchingLoader(PoisonedLoader(loaders.train, poisoned_steps={1, 4, 5, 9}), records)
    result = train(cfg, loaders, device=CPU, sinks=[records])
    steps = [r for r in records if r["kind"] == "step"]  # log_every_steps=1: every step, skipped ones too

    # Replay: the controller fed the logged accuracies in order, at once, makes the loop's decisions.
    replay = build_controller(cfg.controller, len(loaders.train))
    trained = [r for r in steps if not r["skipped"]]
    for record, following in zip(trained, trained[1:]):
        assert replay.step(record["accuracy"]).keep_ratio == following["keep_ratio"]
    assert {"tighten", "warmup", "hold"} <= {r["event"] for r in steps}
    assert [t["keep_ratio"] for t in result.trajectory] == [r["keep_ratio"] for r in trained]

    # When batch i+1 is fetched, steps before i have been read; step i too exactly when the controller
    # may change rho after it (the last warm-up batch, each third trained batch after), never otherwise.
    # The loop learns that a step was skipped only by reading it, so a skipped step there is read too.
    replay, fetches_per_epoch = build_controller(cfg.controller, len(loaders.train)), len(loaders.train)
    for index, record in enumerate(steps):
        may_change = replay.next_step_may_change_keep_ratio
        if not record["skipped"]:
            replay.step(record["accuracy"])
        if (index + 1) % fetches_per_epoch:  # not the epoch's last batch
            assert loaders.train.written_at_fetch[index + 1] == index + (1 if may_change else 0)


def _train_on_rank(rank, world_size, overrides):
    cfg = tiny_config(*overrides)
    result = train(cfg, loaders_for(cfg, rank=rank, world_size=world_size), device=CPU)
    return parameters(result.model), result.trajectory, result.final_record["eval"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_two_replicas_match_one_process_and_share_every_decision(scope):
    overrides = (f"sparsity.scope={scope}", "train.epochs=2", "train.batch_size=32", "controller.interval=2",
                 "controller.tighten_pct=0.3", "eval.keep_ratios=[1.0, 0.3]", "sparsity.calibration_batches=1")
    (params0, trajectory0, eval0), (params1, trajectory1, eval1) = run_gloo(_train_on_rank, 2, overrides)
    single_params, single_trajectory, single_eval = _train_on_rank(0, 1, overrides)
    assert trajectory0 == trajectory1 and eval0 == eval1
    assert [t["keep_ratio"] for t in trajectory0] == [t["keep_ratio"] for t in single_trajectory]
    # Float reassociation in the gradient all-reduce grows over 16 SGD steps: equal to 1e-7 after the first
    # epoch's 8 steps, ~1e-3 of the weights' norm after 16 under the smoke recipe. The tight (rtol 1e-5)
    # 3-step DDP equivalence lives in the sparsity tests. Here: same decisions, identical replicas, and the
    # same weights as a whole (a wrong gradient average, e.g. a sum, would be off by tens of percent).
    for name in single_params:
        assert torch.equal(params0[name], params1[name])
    flat = lambda params: torch.cat([value.flatten().double() for value in params.values()])
    assert (flat(params0) - flat(single_params)).norm() <= 5e-3 * flat(single_params).norm()


def test_warmup_ramps_linearly_then_the_schedule_spans_the_remaining_steps():
    cfg = tiny_config("train.epochs=3", "optim.warmup_epochs=1", "optim.schedule=cosine")
    factor = lr_factor(cfg, steps_per_epoch=4)
    assert [factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4 + 4) == pytest.approx(0.5)  # cosine midpoint of the 8 post-warm-up steps
    assert factor(4 + 8) == pytest.approx(0.0, abs=1e-12)
    no_warmup = lr_factor(tiny_config("train.epochs=3"), steps_per_epoch=4)
    assert no_warmup(0) == 1.0 and no_warmup(6) == pytest.approx(0.5)


def test_gradient_clipping_bounds_the_update():
    # One SGD step without momentum moves the parameters by lr * gradient: clipped, its norm is lr * clip.
    overrides = ("train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=32", "optim.momentum=0",
                 "optim.nesterov=false", "optim.scale_lr=false", "optim.lr=1.0", "controller.strategy=dense")
    moves = {}
    for clip in (None, 0.01):
        cfg = tiny_config(*overrides, f"optim.clip_grad_norm={'null' if clip is None else clip}")
        torch.manual_seed(cfg.run.seed)
        initial = parameters(train(tiny_config(*overrides, "optim.lr=1e-30"), loaders_for(cfg), device=CPU).model)
        final = parameters(train(cfg, loaders_for(cfg), device=CPU).model)
        moves[clip] = torch.cat([(final[k] - initial[k]).flatten() for k in initial]).norm().item()
    assert moves[0.01] == pytest.approx(0.01, rel=1e-3)
    assert moves[None] > 0.05


class BlankLoader:
    """Identical images with every class equally often in each batch: whatever the network predicts for
    them, one class for all, training accuracy is exactly chance."""

    def __init__(self, steps, batch_size, num_classes):
        self.steps = steps
        self.batch = (torch.zeros(batch_size, 3, 16, 16), torch.arange(batch_size) % num_classes)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def test_a_run_at_chance_says_it_is_not_learning(caplog):
    cfg = tiny_config("train.epochs=3", "train.batch_size=32", "controller.strategy=dense")
    loaders = loaders_for(cfg)
    loaders.train = BlankLoader(steps=8, batch_size=32, num_classes=4)
    records = ListSink()
    with caplog.at_level("WARNING", logger="sparsedist.train.loop"):
        train(cfg, loaders, device=CPU, sinks=[records])
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["train_accuracy"] for r in epochs] == [0.25, 0.25, 0.25]
    assert [r["at_chance"] for r in epochs] == [False, True, True]  # the first epoch is allowed to be slow
    assert "not learning: epoch 2" in caplog.text and "not learning: epoch 3" in caplog.text
    assert "NOT LEARNING" in progress_text(epochs[-1], 3, None, None)
    summary = summarize(records, select_keep_ratio=1.0)
    assert summary["not_learning_epochs"] == [2, 3] and "WARNING: not learning" in regime_table(summary)


def test_a_learning_run_is_not_flagged():
    cfg = tiny_config("train.epochs=2", "train.batch_size=32")
    records = ListSink()
    train(cfg, loaders_for(cfg), device=CPU, sinks=[records])
    assert summarize(records, select_keep_ratio=1.0)["not_learning_epochs"] == []


def test_keep_ratios_that_round_alike_get_distinct_regime_names():
    assert [regime_key(r) for r in (1.0, 0.5, 0.1, 0.05)] == ["1.00", "0.50", "0.10", "0.05"]
    assert [regime_key(r) for r in (0.03, 0.025, 0.01, 0.005)] == ["0.03", "0.025", "0.01", "0.005"]
    cfg = tiny_config("train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32",
                      "eval.keep_ratios=[1.0, 0.03, 0.025]")
    accuracies = train(cfg, loaders_for(cfg), device=CPU).final_record["eval"]["test"]
    assert set(accuracies) == {"1.00", "0.03", "0.025"}  # at two decimals 0.025 would overwrite 0.03
