"""The training loop: `train` trains and evaluates a `Config` on given loaders.

`train` reads as its phases, each a method of `_Training`: build (model + sparsity, optimizer,
schedule, controller, loss scaler) -> maybe `restore` -> per epoch: `train_epoch` (`run_step` queues a
step on the device, `read_step` is the host's part: skip, controller, records) -> `evaluate` (the
regime grid and the training keep ratio) -> `record_epoch` -> `on_epoch_end` (checkpointing is the
caller's choice). Works on one process or under torch.distributed's default group; it never imports Ray.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsedist.config import Config, regime_key
from sparsedist.controllers import build_controller
from sparsedist.data.base import Batch, Loaders
from sparsedist.logging import Sink
from sparsedist.models import build_model
from sparsedist.sparsity import ActivationSparsity, StepStats
from sparsedist.train.checkpoint import CheckpointError
from sparsedist.train.distributed import all_reduce_sum, world
from sparsedist.train.host_copy import HostCopies
from sparsedist.train.precision import LossScaler, autocast


log = logging.getLogger(__name__)

# An epoch's training accuracy below this multiple of chance (1/classes) counts as "at chance".
AT_CHANCE_FACTOR = 1.1


def at_chance(train_accuracy: float, num_classes: int, epoch: int) -> bool:
    """Not learning: training accuracy still at chance for a whole epoch after the first."""
    return epoch >= 1 and train_accuracy < AT_CHANCE_FACTOR / num_classes


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss."""


@dataclass
class EpochEnd:
    epoch: int  # 0-based epoch just finished
    record: dict[str, Any]  # the epoch record, identical on every rank
    is_best: bool  # best selection accuracy (eval.selection's split, at eval.select_keep_ratio) so far
    state: Callable[[], dict[str, Any]]  # full checkpoint state as plain data


@dataclass
class MidEpoch:
    """A step boundary inside an epoch where the caller asked for a checkpoint (a preemption notice)."""
    step: int
    state: Callable[[], dict[str, Any]]  # full checkpoint state as plain data; resumes at the next batch


@dataclass
class TrainResult:
    model: nn.Module
    sparsity: ActivationSparsity
    final_record: dict[str, Any] | None
    best_record: dict[str, Any] | None
    # One entry per optimizer step run by this call: step, keep_ratio (used), event, threshold (used).
    trajectory: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _PendingStep:
    """A step queued on the device whose numbers the host has not read yet."""
    epoch: int
    batch: int  # 1-based, within the epoch: what a mid-epoch rewind keeps records by
    keep_ratio: float  # the rho it ran with
    lr: float  # the lr after it (as logged)
    stats: StepStats
    slot: int  # its numbers in the loop's HostCopies


@dataclass
class _EpochTally:
    """Sums over an epoch's trained (not skipped) steps."""
    loss: float = 0.0
    correct: float = 0.0
    examples: float = 0.0
    realized_keep: float = 0.0
    nonfinite_steps: int = 0
    overflow_steps: int = 0  # fp16: trained on (the controller saw them), update skipped by the loss scaler
    events: Counter[str] = field(default_factory=Counter)

    @property
    def trained_steps(self) -> int:
        return sum(self.events.values())  # one event per trained step

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events": dict(self.events)}  # a plain dict: weights-only loading refuses a Counter

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _EpochTally:
        return cls(**{**state, "events": Counter(state["events"])})

    def add(self, loss_sum: float, correct: float, count: float, event: str, realized_keep: float) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.examples += count
        self.realized_keep += realized_keep
        self.events[event] += 1


def scaled_lr(cfg: Config) -> float:
    return cfg.optim.lr * (cfg.train.batch_size / 128 if cfg.optim.scale_lr else 1.0)


def lr_factor(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step t: linear warm-up, then the schedule over the remaining
    ticks; a tick is a step, or an epoch under optim.schedule_every: epoch (the lr holds within an epoch)."""
    optim = cfg.optim
    steps_per_tick = steps_per_epoch if optim.schedule_every == "epoch" else 1
    ticks_per_epoch = steps_per_epoch // steps_per_tick
    warmup = round(optim.warmup_epochs * ticks_per_epoch)
    span = max(1, cfg.train.epochs * ticks_per_epoch - warmup)
    if optim.schedule == "cosine":
        decay = lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    elif optim.schedule == "step":
        milestones = [round(m * span) for m in optim.step_milestones]
        decay = lambda t: optim.step_gamma ** sum(t >= m for m in milestones)
    else:
        decay = lambda t: 1.0
    per_tick = lambda tick: (tick + 1) / warmup if tick < warmup else decay(tick - warmup)
    return lambda t: per_tick(t // steps_per_tick)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """Fused SGD, which can skip a step on the device: the loop sets `found_inf` (a float32 flag) as
    torch.amp.GradScaler does, and a set flag leaves parameters and momentum untouched."""
    optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(cfg), momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay, fused=True)
    optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    if cfg.optim.momentum:
        # The fused step decides on the host whether the momentum buffers are new, so a skipped first
        # step would leave them unset; zeros from the start give the first step's buf = g exactly.
        for parameter in model.parameters():
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return optimizer


def eval_precision(cfg: Config) -> str:
    return cfg.train.precision if cfg.eval.precision == "train" else cfg.eval.precision


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def accuracy_on(model: nn.Module, batches: Iterable[Batch], cfg: Config, device: torch.device) -> float:
    """Accuracy over this rank's batches, summed over replicas (each example counted once)."""
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in batches:
        with autocast(eval_precision(cfg), device):
            logits = model(images)
        counts[0] += (logits.argmax(dim=1) == labels).sum()
        counts[1] += labels.numel()
    all_reduce_sum(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


@contextmanager
def evaluating(model: nn.Module, sparsity: ActivationSparsity) -> Iterator[None]:
    """Eval mode without step statistics; training's modes come back after."""
    was_training, was_collecting = model.training, sparsity.collecting
    model.eval()
    sparsity.collecting = False
    try:
        yield
    finally:
        model.train(was_training)
        sparsity.collecting = was_collecting


def eval_splits(loaders: Loaders) -> dict[str, Iterable[Batch]]:
    return {"val": loaders.val, "test": loaders.test} if loaders.val is not None else {"test": loaders.test}


@torch.no_grad()
def evaluate_regimes(model: nn.Module, sparsity: ActivationSparsity, loaders: Loaders, cfg: Config,
                     device: torch.device) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Per-regime accuracy on validation and test; in network scope tau is calibrated per regime first."""
    with evaluating(model, sparsity):
        splits = eval_splits(loaders)
        accuracies: dict[str, dict[str, float]] = {split: {} for split in splits}
        calibration: dict[str, dict[str, Any]] = {}
        for keep_ratio in cfg.eval.keep_ratios:
            threshold = None
            if sparsity.scope == "network" and keep_ratio < 1.0:
                def run_calibration_forward() -> None:
                    for images, _ in loaders.calibration:
                        with autocast(eval_precision(cfg), device):
                            model(images)

                result = sparsity.calibrate(
                    run_calibration_forward, keep_ratio, tolerance=cfg.sparsity.calibration_tolerance,
                    max_iters=cfg.sparsity.calibration_max_iters,
                )
                threshold = result.threshold
                calibration[regime_key(keep_ratio)] = {
                    "threshold": result.threshold, "realized_keep": result.realized_keep,
                    "iterations": result.iterations, "converged": result.converged,
                }
            with sparsity.regime(keep_ratio, threshold=threshold):
                for split, batches in splits.items():
                    accuracies[split][regime_key(keep_ratio)] = accuracy_on(model, batches, cfg, device)
        return accuracies, calibration


@torch.no_grad()
def evaluate_training_regime(model: nn.Module, sparsity: ActivationSparsity, loaders: Loaders, cfg: Config,
                             device: torch.device) -> dict[str, float]:
    """Accuracy at the keep ratio (and network-scope tau) training has reached, as the released script
    evaluates every epoch: {"keep_ratio", "test", and "val" when there is a validation split}."""
    with evaluating(model, sparsity):
        accuracies = {split: accuracy_on(model, batches, cfg, device) for split, batches in eval_splits(loaders).items()}
    return {"keep_ratio": sparsity.keep_ratio, **accuracies}


class _Training:
    """One training run's state (model, optimizer, schedule, controller, sparsity, loss scaler, counters)
    and its phases as methods; `train` calls them in order."""

    def __init__(self, cfg: Config, loaders: Loaders, device: torch.device, sinks: Sequence[Sink]):
        self.cfg, self.loaders, self.device, self.sinks = cfg, loaders, device, sinks
        self.rank, self.world_size = world()
        steps_per_epoch = len(loaders.train)
        self.controller = build_controller(cfg.controller, steps_per_epoch)
        self.sparsity = ActivationSparsity(cfg.sparsity.scope, keep_ratio=self.controller.keep_ratio)
        model = build_model(cfg.model, loaders.spec.channels, loaders.spec.num_classes, self.sparsity.new_site).to(device)
        if device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.sparsity.to(device)  # rho, tau and the step counts live where the sites run
        # DDP averages gradients; every replica already starts from the same seeded initialization.
        self.trained = DistributedDataParallel(model) if self.world_size > 1 else model
        if cfg.train.compile:
            # Training forwards only; evaluation runs `model` eagerly.
            self.trained = torch.compile(self.trained, mode=cfg.train.compile_mode)
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, steps_per_epoch))
        self.loss_fn = nn.CrossEntropyLoss()
        self.scaler = LossScaler(cfg.train.loss_scale_init, device) if cfg.train.precision == "fp16" else None
        self.select_split = "val" if cfg.eval.selection == "heldout" else "test"
        self.step, self.best_selected, self.consecutive_nonfinite = 0, None, 0
        self.partial_epoch: dict[str, Any] | None = None  # a mid-epoch checkpoint's progress, until resumed
        self.result = TrainResult(model=model, sparsity=self.sparsity, final_record=None, best_record=None)
        # Each step's numbers leave the device in one asynchronous copy: loss sum, correct, count, the
        # non-finite loss and gradient flags, the loss scale, then `StepStats.numbers` (kept and value
        # counts per site, tau).
        self.host_copies = HostCopies(6 + 2 * len(self.sparsity.site_names) + 1, device)
        self.unit_scale = torch.ones(1, dtype=torch.float64, device=device)  # the loss scale without a scaler

    # ---- checkpoints
    def restore(self, state: dict[str, Any]) -> int:
        """Continue from a checkpoint's state; returns the first epoch to train."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # checkpoints of earlier versions saved a foreach SGD
            group.update(fused=True, foreach=None)
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state["controller"])
        self.sparsity.load_state_dict(state["sparsity"])
        set_rng_state(state["rng"], self.device)
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        # "best_val" holds the best selection accuracy on either split (the key predates eval.selection)
        self.step, self.best_selected = state["step"], state["best_val"]
        self.partial_epoch = state.get("partial_epoch")
        if self.partial_epoch is not None:
            # Its batches were cut for that many replicas (each rank's share, its augmentation draws).
            if self.partial_epoch["world_size"] != self.world_size:
                raise CheckpointError(
                    f"this checkpoint was written mid-epoch by {self.partial_epoch['world_size']} workers; resume it "
                    f"with scaling.num_workers={self.partial_epoch['world_size']}, or from an epoch checkpoint")
            self.consecutive_nonfinite = self.partial_epoch["consecutive_nonfinite"]
        return state["epoch"] + 1

    def checkpoint_state(self, epoch: int, partial_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state after `epoch` (-1: none), plus, mid-epoch, how far into the next one: its batches trained,
        their tally and seconds (`partial_epoch`)."""
        return {
            **({"partial_epoch": partial_epoch} if partial_epoch is not None else {}),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "controller": self.controller.state_dict(),
            "sparsity": self.sparsity.state_dict(), "rng": rng_state(self.device), "epoch": epoch, "step": self.step,
            "best_val": self.best_selected, "config": self.cfg.model_dump_json(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    # ---- training
    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def run_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int) -> _PendingStep:
        """Queue one optimizer step on the device; nothing here waits for it."""
        cfg, device, optimizer, scaler = self.cfg, self.device, self.optimizer, self.scaler
        keep_used = self.sparsity.keep_ratio
        with autocast(cfg.train.precision, device):
            logits = self.trained(images)
            loss = self.loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        # Backward always runs so every DDP replica joins the gradient all-reduce; a non-finite
        # step is then dropped on every rank alike (the flags are all-reduced). A finite loss can
        # still give non-finite gradients (fp16: an overflow of the loss scale), so both are checked.
        (loss if scaler is None else scaler.scale_loss(loss)).backward()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        if scaler is not None:
            scaler.unscale_(gradients)
        grad_norm = torch.nn.utils.get_total_norm(gradients)
        batch = all_reduce_sum(torch.stack([
            loss.detach().double() * labels.numel(),
            (logits.detach().argmax(dim=1) == labels).sum().double(),
            torch.full((), labels.numel(), dtype=torch.float64, device=device),  # a fill: no host copy
            (~torch.isfinite(loss.detach())).double(),
            (~torch.isfinite(grad_norm)).double(),
        ]))
        skipped = (batch[3] + batch[4]) > 0
        # The skip is decided on the device: the fused SGD step reads `found_inf` and leaves the
        # parameters and momentum untouched when it is set (torch.amp.GradScaler's mechanism;
        # as with it, the lr schedule advances on a skipped batch too).
        optimizer.found_inf.copy_(skipped)
        if cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), cfg.optim.clip_grad_norm, grad_norm)
        optimizer.step()
        self.scheduler.step()
        loss_scale = self.unit_scale
        if scaler is not None:
            loss_scale = scaler.scale.double().view(1)  # a copy: the scale this step ran with
            scaler.update(skipped)
        stats = self.sparsity.finish_step(skipped=skipped)
        return _PendingStep(epoch, batch_index, keep_used, optimizer.param_groups[0]["lr"], stats,
                            self.host_copies.send(torch.cat([batch, loss_scale, stats.numbers])))

    def read_step(self, pending: _PendingStep, tally: _EpochTally) -> None:
        """The host's part of a step, once its numbers are read: the skip, the controller, the records."""
        cfg, controller, sparsity = self.cfg, self.controller, self.sparsity
        loss_sum, correct, count, loss_nonfinite, grads_nonfinite, loss_scale, *statistics = (
            self.host_copies.receive(pending.slot))
        pending.stats.read_from(statistics)
        # fp16: gradients that overflow the loss scale are routine; the batch still counts, as in the
        # released script, whose controller sees every batch while GradScaler skips the update.
        overflow = self.scaler is not None and bool(grads_nonfinite) and not loss_nonfinite
        if (loss_nonfinite or grads_nonfinite) and not overflow:
            tally.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            self.write({"kind": "step", "epoch": pending.epoch, "batch": pending.batch, "step": self.step,
                        "skipped": True, "loss": None,
                        "event": "nonfinite", "keep_ratio": pending.keep_ratio, "threshold": pending.stats.threshold})
            if self.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive steps had a NaN/Inf loss (train.max_nonfinite_steps="
                    f"{cfg.train.max_nonfinite_steps}); stopping at epoch {pending.epoch}, step {self.step}. The last "
                    "good checkpoint is intact; lower optim.lr or check the data."
                )
            return
        self.consecutive_nonfinite = 0
        self.step += 1
        accuracy = correct / count
        may_change = controller.next_step_may_change_keep_ratio
        decision = controller.step(accuracy)
        if decision.keep_ratio != sparsity.keep_ratio and not may_change:  # this step may have been read late
            raise RuntimeError(f"the controller changed rho at step {self.step} after saying it would not: "
                               "a strategy's next_observation_decides is wrong")
        sparsity.set_keep_ratio(decision.keep_ratio)
        tally.add(loss_sum, correct, count, decision.event, pending.stats.realized_keep)
        tally.overflow_steps += overflow
        self.result.trajectory.append({"step": self.step, "keep_ratio": pending.keep_ratio, "event": decision.event,
                                       "threshold": pending.stats.threshold})
        if self.step % cfg.train.log_every_steps == 0 or decision.event not in ("hold", "warmup") or overflow:
            self.write({
                "kind": "step", "epoch": pending.epoch, "batch": pending.batch, "step": self.step, "skipped": False,
                "loss": loss_sum / count,
                "accuracy": accuracy, "keep_ratio": pending.keep_ratio, "threshold": pending.stats.threshold,
                "realized_keep": pending.stats.realized_keep, "event": decision.event, "lr": pending.lr,
                "density": pending.stats.site_density,
                **({"loss_scale": loss_scale, "overflow": overflow} if self.scaler is not None else {}),
            })

    def train_epoch(self, epoch: int, checkpoint_requested: Callable[[], bool] | None = None,
                    on_mid_epoch: Callable[[MidEpoch], None] | None = None) -> tuple[_EpochTally, float]:
        """One epoch's steps; returns their tally and the seconds they took. Every run.preemption_check_steps
        batches it asks `checkpoint_requested` (every rank at the same batch) and, on yes, hands a mid-epoch
        checkpoint to `on_mid_epoch`. An epoch resumed from one skips the batches it had trained."""
        self.loaders.train.set_epoch(epoch)
        self.model.train()
        self.sparsity.collecting = True
        tally, trained, seconds_before = _EpochTally(), 0, 0.0
        if self.partial_epoch is not None:
            tally = _EpochTally.from_state(self.partial_epoch["tally"])
            trained, seconds_before = self.partial_epoch["batches"], self.partial_epoch["seconds"]
            self.partial_epoch = None
        batches, check_every = len(self.loaders.train), self.cfg.run.preemption_check_steps
        start = time.perf_counter()
        queued: deque[_PendingStep] = deque()
        # A resumed epoch still loads the batches it skips: the data order and augmentation draws continue exactly.
        for done, (images, labels) in enumerate(self.loaders.train, start=1):
            if done <= trained:
                continue
            queued.append(self.run_step(images, labels, epoch, done))
            # Read the steps before this one (the device has moved on to this one), and this one too
            # when the controller may change rho after it: the next batch must run at the decided rho.
            # Every other step is read one step late, and the device never waits for the host.
            while len(queued) > 1 or (queued and self.controller.next_step_may_change_keep_ratio):
                self.read_step(queued.popleft(), tally)
            if checkpoint_requested and check_every and done % check_every == 0 and done < batches and checkpoint_requested():
                while queued:  # reading early changes nothing the steps compute, only when the host learns it
                    self.read_step(queued.popleft(), tally)
                progress = {"epoch": epoch, "batches": done, "tally": tally.state_dict(),
                            "seconds": seconds_before + time.perf_counter() - start, "world_size": self.world_size,
                            "consecutive_nonfinite": self.consecutive_nonfinite}
                on_mid_epoch(MidEpoch(self.step, lambda: self.checkpoint_state(epoch - 1, progress)))
        while queued:
            self.read_step(queued.popleft(), tally)
        return tally, seconds_before + time.perf_counter() - start

    # ---- evaluation and the epoch record
    def evaluate(self, epoch: int) -> tuple[dict, dict, dict]:
        """The regime grid and the training keep ratio on the evaluation epochs; empty otherwise."""
        cfg = self.cfg
        if epoch != cfg.train.epochs - 1 and (epoch + 1) % cfg.eval.every_epochs:
            return {}, {}, {}
        accuracies, calibration = evaluate_regimes(self.model, self.sparsity, self.loaders, cfg, self.device)
        return accuracies, calibration, evaluate_training_regime(self.model, self.sparsity, self.loaders, cfg, self.device)

    def record_epoch(self, epoch: int, tally: _EpochTally, train_time: float,
                     evaluation: tuple[dict, dict, dict]) -> tuple[dict[str, Any], bool]:
        """The epoch record (written to the sinks) and whether its checkpoint is the best so far."""
        cfg, sparsity = self.cfg, self.sparsity
        accuracies, calibration, at_training_keep = evaluation
        selection_accuracy = accuracies.get(self.select_split, {}).get(regime_key(cfg.eval.select_keep_ratio))
        is_best = selection_accuracy is not None and (self.best_selected is None or selection_accuracy > self.best_selected)
        if is_best:
            self.best_selected = selection_accuracy
        train_accuracy = tally.correct / max(tally.examples, 1)
        stalled = at_chance(train_accuracy, self.loaders.spec.num_classes, epoch)
        if stalled and self.rank == 0:
            log.warning("not learning: epoch %d training accuracy %.3f is at chance (1/%d); the controller's "
                        "decisions mean nothing until it learns (see optim.clip_grad_norm, optim.lr; docs/recipe.md)",
                        epoch + 1, train_accuracy, self.loaders.spec.num_classes)
        record = {
            "kind": "epoch", "epoch": epoch, "step": self.step,
            "train_loss": tally.loss / max(tally.examples, 1),
            "train_accuracy": train_accuracy, "at_chance": stalled,
            "keep_ratio": sparsity.keep_ratio, "threshold": sparsity.threshold,
            "realized_keep": tally.realized_keep / max(1, tally.trained_steps), "events": dict(tally.events),
            "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": train_time,
            "images_per_sec": tally.examples / train_time if train_time > 0 else 0.0,
            "nonfinite_steps": tally.nonfinite_steps, "overflow_steps": tally.overflow_steps, "is_best": is_best,
            # Selection is labelled by its split: best-on-test (eval.selection paper) is never called validation.
            "selection": cfg.eval.selection,
            "best_val_accuracy": self.best_selected if self.select_split == "val" else None,
            "best_test_accuracy": self.best_selected if self.select_split == "test" else None,
            "eval": accuracies, "eval_current": at_training_keep, "calibration": calibration,
        }
        self.write(record)
        self.result.final_record = record
        if is_best:
            self.result.best_record = record
        return record, is_best


def train(cfg: Config, loaders: Loaders, *, device: torch.device, sinks: Sequence[Sink] = (),
          on_epoch_end: Callable[[EpochEnd], None] | None = None, resume_state: dict[str, Any] | None = None,
          checkpoint_requested: Callable[[], bool] | None = None,
          on_mid_epoch: Callable[[MidEpoch], None] | None = None) -> TrainResult:
    """Train `cfg`; `on_epoch_end` gets every epoch's record and state, `on_mid_epoch` a mid-epoch state whenever
    `checkpoint_requested` says yes (asked every run.preemption_check_steps batches, on every rank alike)."""
    if device.type == "cuda":
        # Bitwise-reproducible steps (seeded reruns, resume): cuDNN's autotuner and non-deterministic
        # kernels would let an attempt drift from the one it continues. cuBLAS needs
        # CUBLAS_WORKSPACE_CONFIG too, set by the worker before CUDA starts.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    run = _Training(cfg, loaders, device, sinks)
    start_epoch = 0 if resume_state is None else run.restore(resume_state)
    for epoch in range(start_epoch, cfg.train.epochs):
        tally, train_time = run.train_epoch(epoch, checkpoint_requested, on_mid_epoch)
        record, is_best = run.record_epoch(epoch, tally, train_time, run.evaluate(epoch))
        if on_epoch_end is not None:
            on_epoch_end(EpochEnd(epoch=epoch, record=record, is_best=is_best,
                                  state=lambda epoch=epoch: run.checkpoint_state(epoch)))
    return run.result
