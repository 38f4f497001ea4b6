"""The released script's protocol: its settings in the paper presets, fp16 with dynamic loss scaling, the
per-epoch cosine, evaluation at the training keep ratio, and best-on-test selection labelled as such."""

import math

import pytest
import torch

from sparsedist.config import ConfigError, load_config
from sparsedist.report.summary import regime_table, summarize
from sparsedist.models import build_model
from sparsedist.sparsity import ActivationSparsity
from sparsedist.train.checkpoint import load_checkpoint, save_checkpoint
from sparsedist.train.loop import evaluate_regimes, lr_factor, train
from sparsedist.train.precision import LossScaler
from tests.distributed import run_gloo
from tests.helpers import SPEC, loaders_for, tiny_config

CPU = torch.device("cpu")

# (config path, value, the released script's setting it reproduces), for every paper preset.
RELEASED = [
    ("data.dataset", "cifar10", "torchvision CIFAR10"),
    ("data.augment", False, "ToTensor + Normalize only: no augmentation"),
    ("data.val_fraction", 0.0, "trains on all 50,000 training images"),
    ("model.arch", "wrn", "pre-activation WideResNet"),
    ("model.depth", 28, "WRN-28"),
    ("model.widen_factor", 4, "widen factor 4"),
    ("model.dropout", 0.0, "no dropout"),
    ("model.norm_eps", 1e-8, "RMSNorm eps 1e-8"),
    ("model.norm_bias", True, "RMSNorm learned gain and bias"),
    ("model.norm_output", "promoted", "fp32 norm output under autocast (pow runs in fp32)"),
    ("model.shortcut", "raw", "1x1 shortcut reads the raw block input"),
    ("model.head_init", "kaiming", "classifier kaiming-normal (linear), zero bias"),
    ("sparsity.scope", "layer", "top-k per sample, per layer ('global' mode)"),
    ("optim.lr", 0.1, "lr 0.1 x batch/128"),
    ("optim.scale_lr", True, "lr 0.1 x batch/128"),
    ("optim.momentum", 0.9, "SGD momentum 0.9"),
    ("optim.nesterov", True, "Nesterov"),
    ("optim.weight_decay", 0.0, "weight decay 0"),
    ("optim.schedule", "cosine", "CosineAnnealingLR"),
    ("optim.schedule_every", "epoch", "scheduler.step() once per epoch"),
    ("optim.warmup_epochs", 0.0, "no warm-up"),
    ("optim.clip_grad_norm", None, "no gradient clipping"),
    ("train.epochs", 500, "500 epochs, T_max=500"),
    ("train.batch_size", 128, "batch 128, drop_last"),
    ("train.precision", "fp16", "torch.cuda.amp.autocast() + GradScaler"),
    ("train.loss_scale_init", 2.0**16, "GradScaler() defaults"),
    ("eval.precision", "fp32", "evaluation without autocast"),
    ("eval.selection", "paper", "best checkpoint by dense test accuracy"),
    ("eval.select_keep_ratio", 1.0, "dense (rho = 1) test accuracy"),
    ("eval.every_epochs", 1, "evaluates every epoch"),
    ("run.seed", 3407, "seed 3407"),
]
STRATEGY_1 = {  # the controller class's defaults
    "keep_init": 1.0, "keep_min": 0.2, "keep_max": 1.0, "tighten_pct": 0.02, "relax_step": 0.03,
    "max_relax_jump": 0.03, "ema_beta": 0.9, "drop_tol": 0.01, "cooldown": 3, "relax_gain": 1.5, "interval": 50,
}
STRATEGY_2 = {  # the run configuration
    "keep_init": 1.0, "keep_min": 0.0, "keep_max": 1.0, "tighten_pct": 0.018, "relax_step": 1.0,
    "max_relax_jump": 1.0, "ema_beta": 0.5, "drop_tol": 0.12, "cooldown": 3, "relax_gain": 1.5, "interval": 128,
}


def field(cfg, path):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("preset, controller", [("paper-dense", {"strategy": "dense"}),
                                                ("paper-s1", {"strategy": "adaptive", **STRATEGY_1}),
                                                ("paper-s2", {"strategy": "adaptive", **STRATEGY_2})])
def test_paper_presets_hold_every_released_setting(preset, controller):
    cfg = load_config(preset)
    mismatches = [(path, field(cfg, path), value, setting) for path, value, setting in RELEASED
                  if field(cfg, path) != value]
    mismatches += [(f"controller.{key}", getattr(cfg.controller, key), value, "controller")
                   for key, value in controller.items() if getattr(cfg.controller, key) != value]
    assert not mismatches
    assert cfg.controller.warmup_epochs == 0.0 and 1.0 in cfg.eval.keep_ratios


def test_strategy1_is_the_controller_class_defaults():
    defaults = load_config(None, ["controller.strategy=adaptive"]).controller
    assert {key: getattr(defaults, key) for key in STRATEGY_1} == STRATEGY_1


@pytest.mark.parametrize("overrides", [
    ["data.val_fraction=0"],  # heldout (the default) needs a split
    ["eval.selection=paper", "data.val_fraction=0.1"],  # paper trains on every image
])
def test_selection_and_validation_split_must_agree(overrides):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert [problem[0] for problem in caught.value.problems] == ["data.val_fraction"]


def test_the_validation_split_follows_the_selection_unless_set():
    assert load_config().data.val_fraction == 0.1
    assert load_config("paper-s2").data.val_fraction == 0.0
    assert load_config("paper-s2", ["eval.selection=heldout"]).data.val_fraction == 0.1
    assert load_config(None, ["data.val_fraction=0.05"]).data.val_fraction == 0.05


def test_per_epoch_cosine_is_the_released_cosine_annealing():
    cfg = tiny_config("train.epochs=5", "optim.schedule=cosine", "optim.schedule_every=epoch")
    factor = lr_factor(cfg, steps_per_epoch=3)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    released = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    for epoch in range(5):
        for t in range(epoch * 3, epoch * 3 + 3):  # the lr holds for the whole epoch
            assert factor(t) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()  # the epoch's updates (no gradients here), then the script's scheduler.step()
        released.step()


def test_loss_scaler_follows_grad_scalers_rule():
    # One overflow, 2000 finite steps (a growth), overflows in a row, then finite steps again.
    overflows = [True] + [False] * 2000 + [True, True] + [False] * 5
    ours = LossScaler(2.0**16, CPU)
    reference = torch.amp.GradScaler("cpu")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.0)
    reference.scale(torch.ones(()))  # GradScaler creates its scale on first use
    for overflow in overflows:
        parameter.grad = torch.full((1,), math.inf if overflow else 1.0)
        reference.unscale_(optimizer)
        reference.step(optimizer)
        reference.update()
        ours.update(torch.tensor(overflow))
        assert ours.state_dict() == {"scale": reference.get_scale(), "growth_tracker": reference._growth_tracker.item()}
    assert ours.state_dict()["scale"] == 2.0**14  # 2^16, halved, doubled after 2000 steps, halved twice


class ListSink(list):
    def write(self, record):
        self.append(record)

    def close(self):
        pass


# fp16 on a CPU: the loop computes in fp32 on CPUs, so these tests wrap it in CPU fp16 autocast, where
# scaled gradients overflow fp16 for real, as they do on a GPU. A 2^24 start overflows from the first step.
FP16 = ("train.precision=fp16", "train.loss_scale_init=16777216", "train.epochs=2", "train.batch_size=32",
        "train.max_steps_per_epoch=4", "eval.keep_ratios=[1.0]", "controller.interval=1")


def train_fp16(cfg, **kwargs):
    with torch.autocast("cpu", dtype=torch.float16):
        return train(cfg, loaders_for(cfg), device=CPU, **kwargs)


def initial_parameters(cfg):
    torch.manual_seed(cfg.run.seed)  # as the loop builds its model
    model = build_model(cfg.model, SPEC.channels, SPEC.num_classes, ActivationSparsity("layer", 1.0).new_site)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_fp16_overflow_skips_the_update_halves_the_scale_and_the_controller_sees_the_batch(tmp_path):
    cfg = tiny_config(*FP16)
    sink = ListSink()

    def keep_epoch_0(end):
        if end.epoch == 0:
            save_checkpoint(end.state(), str(tmp_path / "epoch_00000"))

    straight = train_fp16(cfg, sinks=[sink], on_epoch_end=keep_epoch_0)
    steps = [r for r in sink if r["kind"] == "step"]
    assert len(straight.trajectory) == len(steps) == 8, "every batch reaches the controller, overflowing or not"
    overflows = [s["overflow"] for s in steps]
    assert overflows[:2] == [True, True] and not all(overflows)
    for before, after in zip(steps, steps[1:]):  # an overflow halves the scale, a finite step keeps it
        assert after["loss_scale"] == before["loss_scale"] * (0.5 if before["overflow"] else 1.0)
    epochs = [r for r in sink if r["kind"] == "epoch"]
    assert [e["overflow_steps"] for e in epochs] == [sum(overflows[:4]), sum(overflows[4:])]

    # Only overflowing steps: the parameters are the initial ones.
    only_overflows = train_fp16(tiny_config(*FP16, "train.epochs=1", "train.max_steps_per_epoch=2"))
    for name, value in initial_parameters(cfg).items():
        assert torch.equal(only_overflows.model.state_dict()[name], value), name
    assert not all(torch.equal(straight.model.state_dict()[k], v) for k, v in initial_parameters(cfg).items())

    # Resume restores the scale: the second epoch is bitwise the straight run's.
    resumed = train_fp16(cfg, resume_state=load_checkpoint(str(tmp_path / "epoch_00000")))
    assert resumed.trajectory == straight.trajectory[4:]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def _fp16_steps_on_rank(rank, world_size, overrides):
    cfg = tiny_config(*overrides)
    sink = ListSink()
    with torch.autocast("cpu", dtype=torch.float16):
        result = train(cfg, loaders_for(cfg, rank=rank, world_size=world_size), device=CPU, sinks=[sink])
    steps = [(r["overflow"], r["loss_scale"]) for r in sink if r["kind"] == "step"]
    return steps, result.trajectory, {k: v.clone() for k, v in result.model.state_dict().items()}


def test_fp16_replicas_skip_the_same_steps_and_stay_identical():
    overrides = (*FP16, "train.epochs=1", "train.loss_scale_init=1048576")  # 2^20: two or so overflows, then steps
    (steps0, trajectory0, weights0), (steps1, trajectory1, weights1) = run_gloo(_fp16_steps_on_rank, 2, overrides)
    assert steps0 == steps1 and trajectory0 == trajectory1
    assert {overflow for overflow, _ in steps0} == {True, False}, "the run should overflow, then train"
    for name, value in weights0.items():
        assert torch.equal(value, weights1[name]), name


@pytest.mark.parametrize("norm_output, site_dtype", [("promoted", torch.float32), ("input", torch.float16)])
def test_every_site_sees_the_dtype_autocast_gives_the_released_norm(norm_output, site_dtype):
    sparsity = ActivationSparsity("layer", keep_ratio=0.5)
    cfg = tiny_config(f"model.norm_output={norm_output}")
    model = build_model(cfg.model, 3, 4, sparsity.new_site)
    seen = {}

    def record_dtypes(module, inputs, output):
        seen[module] = (inputs[0].dtype, output.dtype)

    for name, module in model.named_modules():
        if name.endswith(("site1", "site2", "final_site")):
            module.register_forward_hook(record_dtypes)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(torch.randn(2, 3, 16, 16))
    assert len(seen) == 7 and set(seen.values()) == {(site_dtype, site_dtype)}
    assert logits.dtype == torch.float16  # the convolutions and the head still run in fp16


def test_paper_selection_picks_by_test_accuracy_labels_it_and_evaluates_at_the_training_keep_ratio():
    cfg = tiny_config("train.epochs=3", "train.batch_size=32", "eval.selection=paper", "data.val_fraction=0",
                      "eval.keep_ratios=[1.0, 0.5]")
    sink = ListSink()
    result = train(cfg, loaders_for(cfg), device=CPU, sinks=[sink])
    epochs = [r for r in sink if r["kind"] == "epoch"]
    assert all(set(e["eval"]) == {"test"} and e["best_val_accuracy"] is None for e in epochs)
    best = max(e["eval"]["test"]["1.00"] for e in epochs)
    assert epochs[-1]["best_test_accuracy"] == best
    assert [e["is_best"] for e in epochs].index(True) == 0
    assert next(e for e in reversed(epochs) if e["is_best"])["eval"]["test"]["1.00"] == best

    # The evaluation at the training keep ratio is the grid's evaluation at that keep ratio.
    final = epochs[-1]["eval_current"]
    assert final["keep_ratio"] == result.sparsity.keep_ratio < 1.0 and "val" not in final
    grid = tiny_config("train.epochs=3", "train.batch_size=32", "eval.selection=paper", "data.val_fraction=0",
                       f"eval.keep_ratios=[{final['keep_ratio']!r}]", f"eval.select_keep_ratio={final['keep_ratio']!r}")
    accuracies, _ = evaluate_regimes(result.model, result.sparsity, loaders_for(grid), grid, CPU)
    assert list(accuracies["test"].values()) == [final["test"]]

    summary = summarize(list(sink), select_keep_ratio=1.0)
    assert "best-on-test" in summary["selected"]["selected_by"] and summary["selected"]["val"] is None
    table = regime_table(summary)
    assert "best-on-test (epoch" in table and f"test {final['test']:.4f}" in table
