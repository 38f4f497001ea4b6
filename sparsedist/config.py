"""The one source of configuration: a pydantic v2 tree, YAML presets and dotted overrides.

Every field is documented where it is declared. Cross-field rules raise errors located at the
offending field, so `sparsedist config validate` can list every problem with its dotted path.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from sparsedist import storage

DATASETS = ("synthetic", "cifar10", "cifar100", "fashion-mnist")
STRATEGIES = ("dense", "fixed", "cyclic", "adaptive")
PRESETS_PACKAGE = "sparsedist.configs"
DEFAULT_VAL_FRACTION = 0.1  # held out under eval.selection heldout unless data.val_fraction says otherwise


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def raise_field_errors(title: str, problems: list[tuple[str, str, Any]]) -> None:
    """Raise one ValidationError with an entry per (field, message, value) cross-field problem."""
    if not problems:
        return
    details = [
        InitErrorDetails(
            type=PydanticCustomError("cross_field", message.replace("{", "(").replace("}", ")")),
            loc=(field,),
            input=value,
        )
        for field, message, value in problems
    ]
    raise ValidationError.from_exception_data(title, details)


def _absolute(path: str | None) -> str | None:
    return None if path is None else storage.absolute(path)


# --------------------------------------------------------------------------------------- data
class SyntheticConfig(Section):
    train_size: int = Field(2048, ge=16, description="Images in the synthetic training set (validation holdout included).")
    test_size: int = Field(512, ge=8, description="Images in the synthetic test set.")
    num_classes: int = Field(10, ge=2, le=1000, description="Number of synthetic classes.")
    image_size: int = Field(32, ge=8, le=256, description="Height and width of synthetic images in pixels.")
    channels: Literal[1, 3] = Field(3, description="Channels of synthetic images (3 = CIFAR-shaped).")
    noise: float = Field(0.5, ge=0.0, le=4.0, description="Noise level relative to the class pattern; higher is harder.")
    seed: int = Field(0, ge=0, description="Seed that fixes the synthetic images (independent of run.seed).")


class DataConfig(Section):
    dataset: Literal["synthetic", "cifar10", "cifar100", "fashion-mnist"] = Field(
        "synthetic", description="Dataset name: one of synthetic, cifar10, cifar100, fashion-mnist."
    )
    root: str = Field(
        "~/.cache/sparsedist/data",
        description="Directory holding the prepared .beton files and the raw downloads (made absolute on load; "
        "shared storage on clusters).",
    )
    source: str | None = Field(
        None,
        description="An already-downloaded copy to read instead of downloading: the CIFAR python archive "
        "(.tar.gz) or its extracted folder, or a folder of Fashion-MNIST IDX files.",
    )
    download: bool = Field(True, description="Allow torchvision to download the dataset when no local copy exists.")
    val_fraction: float | None = Field(
        None, ge=0.0, lt=0.5, description="Fraction of the training set held out (seeded, fixed) for model selection; "
        "default (null): 0.1 under eval.selection heldout, 0 under paper (every training image is trained on).",
    )
    val_seed: int = Field(0, ge=0, description="Seed of the validation holdout permutation.")
    augment: bool = Field(False, description="Random crop (pad 4) and horizontal flip in torch with a seeded generator; the paper uses none.")
    loader_workers: int | None = Field(
        None, ge=1, le=64,
        description="FFCV loader threads per training worker; default (null): the worker's CPU allotment, scaling.cpus_per_worker.",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Synthetic dataset settings.")

    _abs_root = field_validator("root", "source")(classmethod(lambda cls, v: _absolute(v)))


# -------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    arch: Literal["wrn"] = Field("wrn", description="Backbone: pre-activation Wide ResNet with RMSNorm.")
    depth: int = Field(28, ge=10, description="WRN depth d; (d - 4) must be divisible by 6.")
    widen_factor: int = Field(4, ge=1, le=20, description="WRN widen factor k.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout between the two convolutions of a block.")
    norm_eps: float = Field(1e-8, gt=0.0, description="RMSNorm epsilon (the released script's effective value: 1e-8).")
    norm_bias: bool = Field(True, description="Learned per-channel RMSNorm bias beside the gain (the released script has one).")
    shortcut: Literal["raw", "activated"] = Field(
        "raw",
        description="Input of the 1x1 projection shortcut: raw = the block input (the released script); activated = "
        "its normalized, activated, sparsified version (the common pre-activation WRN).",
    )
    head_init: Literal["kaiming", "torch"] = Field(
        "kaiming", description="Classifier weights: kaiming = kaiming-normal, linear gain (the released script); "
        "torch = PyTorch's default uniform. The bias starts at zero either way.",
    )
    norm_output: Literal["promoted", "input"] = Field(
        "promoted", description="Dtype of every RMSNorm's output, hence of the ReLU and the top-k after it: promoted = "
        "what type promotion makes of the released script's norm (fp32 under bf16/fp16 autocast, where its statistics "
        "and parameters are fp32); input = the input's dtype (bf16/fp16 sites: half the memory traffic, top-k on "
        "rounded values).",
    )

    @model_validator(mode="after")
    def _depth_shape(self) -> ModelConfig:
        if (self.depth - 4) % 6:
            raise_field_errors("model", [("depth", "depth - 4 must be divisible by 6", self.depth)])
        return self


# ----------------------------------------------------------------------------------- sparsity
class SparsityConfig(Section):
    scope: Literal["layer", "network"] = Field(
        "layer",
        description="layer: per-sample, per-site top-k (the paper). network: one all-layer threshold for every "
        "site and the whole global batch.",
    )
    calibration_batches: int = Field(
        4, ge=1, description="Training batches used to calibrate the network-scope threshold for each eval regime."
    )
    calibration_tolerance: float = Field(
        0.01, gt=0.0, lt=0.5, description="Calibration stops when |realized/requested - 1| is below this."
    )
    calibration_max_iters: int = Field(8, ge=1, le=100, description="Cap on calibration passes per regime.")


# -------------------------------------------------------------------------------- controllers
class ControllerCommon(Section):
    warmup_epochs: float = Field(0.0, ge=0.0, description="Dense (keep ratio 1) epochs before the controller starts.")


def _check_interval(section: Section) -> list[tuple[str, str, Any]]:
    if section.interval_epochs is not None and section.interval_epochs <= 0:
        return [("interval_epochs", "must be > 0", section.interval_epochs)]
    return []


class DenseControllerConfig(ControllerCommon):
    strategy: Literal["dense"] = Field("dense", description="Always keep every activation (rho = 1).")


class FixedControllerConfig(ControllerCommon):
    strategy: Literal["fixed"] = Field("fixed", description="A constant keep ratio.")
    keep_ratio: float = Field(0.1, gt=0.0, le=1.0, description="The constant keep ratio rho.")


class CyclicControllerConfig(ControllerCommon):
    strategy: Literal["cyclic"] = Field(
        "cyclic", description="Non-adaptive reference: rho <- rho * (1 - rate) every interval, back to keep_init under floor."
    )
    keep_init: float = Field(1.0, gt=0.0, le=1.0, description="Starting keep ratio (and the value after a reset).")
    rate: float = Field(0.05, gt=0.0, lt=1.0, description="Fractional compression per interval.")
    floor: float = Field(0.05, gt=0.0, lt=1.0, description="When rho would fall below this it resets to 1.")
    interval: int = Field(128, ge=1, description="Batches between compressions.")
    interval_epochs: float | None = Field(None, description="If set, the interval as a fraction of an epoch (overrides interval).")

    @model_validator(mode="after")
    def _rules(self) -> CyclicControllerConfig:
        problems = _check_interval(self)
        if self.floor >= self.keep_init:
            problems.append(("floor", f"must be < keep_init ({self.keep_init})", self.floor))
        raise_field_errors("controller", problems)
        return self


class AdaptiveControllerConfig(ControllerCommon):
    """The released script's controller. Defaults are its class defaults (the gradual variant)."""

    strategy: Literal["adaptive"] = Field("adaptive", description="EMA-of-accuracy controller: tighten while accuracy holds, relax on a drop.")
    keep_init: float = Field(1.0, ge=0.0, le=1.0, description="Starting keep ratio rho_init.")
    keep_min: float = Field(0.2, ge=0.0, le=1.0, description="Floor rho_min for tightening.")
    keep_max: float = Field(1.0, gt=0.0, le=1.0, description="Ceiling rho_max for relaxing.")
    tighten_pct: float = Field(0.02, ge=0.0, lt=1.0, description="Tighten: rho <- max(rho_min, rho * (1 - tighten_pct)).")
    relax_step: float = Field(0.03, ge=0.0, le=1.0, description="Base relax increment of rho.")
    max_relax_jump: float = Field(
        0.03, ge=0.0, le=1.0, description="Cap on one relax increment (1.0 = full reset to dense; 0 = no cap, as in the "
        "released script).")
    relax_gain: float = Field(1.5, ge=0.0, description="How fast the relax increment grows with the excess drop.")
    ema_beta: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the global batch accuracy.")
    drop_tol: float = Field(0.01, gt=0.0, lt=1.0, description="Relax when best EMA - EMA exceeds this.")
    cooldown: int = Field(3, ge=0, description="Decisions without tightening after a relax.")
    interval: int = Field(50, ge=1, description="Batches between decisions N.")
    interval_epochs: float | None = Field(None, description="If set, the decision interval as a fraction of an epoch (overrides interval).")

    @model_validator(mode="after")
    def _rules(self) -> AdaptiveControllerConfig:
        problems = _check_interval(self)
        if self.keep_min > self.keep_init:
            problems.append(("keep_min", f"must be <= keep_init ({self.keep_init})", self.keep_min))
        if self.keep_init > self.keep_max:
            problems.append(("keep_init", f"must be <= keep_max ({self.keep_max})", self.keep_init))
        if self.keep_init == 0:
            problems.append(("keep_init", "must be > 0", self.keep_init))
        raise_field_errors("controller", problems)
        return self


ControllerConfig = Annotated[
    Union[DenseControllerConfig, FixedControllerConfig, CyclicControllerConfig, AdaptiveControllerConfig],
    Field(discriminator="strategy"),
]


# -------------------------------------------------------------------------- optim/train/eval
class OptimConfig(Section):
    lr: float = Field(0.1, gt=0.0, description="SGD learning rate at batch 128; the used rate is lr * batch_size / 128 when scale_lr.")
    scale_lr: bool = Field(True, description="Scale lr linearly with the global batch size (the paper's rule).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 weight decay.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Learning-rate schedule over all training steps.")
    schedule_every: Literal["step", "epoch"] = Field(
        "step", description="How often the schedule moves: every optimizer step, or once per epoch (the released "
        "script's CosineAnnealingLR(T_max=epochs); warm-up then counts whole epochs).",
    )
    step_milestones: list[float] = Field(
        [0.5, 0.75], description="step schedule: fractions of training at which lr is multiplied by step_gamma."
    )
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: multiplicative decay.")
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="Linear learning-rate warm-up from lr/steps to lr over this many epochs; the schedule "
        "then spans the remaining steps (0: none, the released recipe).",
    )
    clip_grad_norm: float | None = Field(
        None, gt=0.0, description="Clip the global gradient norm to this value before each update (null: no clipping, "
        "the released recipe).",
    )

    @model_validator(mode="after")
    def _rules(self) -> OptimConfig:
        problems = []
        if self.nesterov and self.momentum == 0:
            problems.append(("nesterov", "Nesterov momentum needs momentum > 0", self.nesterov))
        if any(not 0 < m < 1 for m in self.step_milestones) or self.step_milestones != sorted(self.step_milestones):
            problems.append(("step_milestones", "must be increasing fractions in (0, 1)", self.step_milestones))
        raise_field_errors("optim", problems)
        return self


class TrainConfig(Section):
    epochs: int = Field(500, ge=1, description="Training epochs.")
    batch_size: int = Field(128, ge=1, description="Global batch size, split evenly over scaling.num_workers.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on training steps per epoch (short smoke runs).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training autocast dtype (CUDA only; CPU computes in fp32). fp16 adds dynamic loss scaling "
        "(torch.amp.GradScaler's rule, on CPU too): an overflowing step is skipped on every replica and the scale halves.",
    )
    loss_scale_init: float = Field(2.0**16, gt=0.0, description="fp16: the starting loss scale (GradScaler's default).")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA.")
    compile: bool = Field(
        False, description="torch.compile the training model with its sparsity sites (rho and tau are read from "
        "device tensors, so controller decisions recompile nothing).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode (with train.compile): reduce-overhead replays each compiled step as "
        "a CUDA graph, which a step allows since it reads nothing from the device; max-autotune also tunes kernels.",
    )
    max_nonfinite_steps: int = Field(
        10, ge=1, description="Consecutive NaN/Inf-loss steps (each skipped) after which the run stops."
    )
    log_every_steps: int = Field(10, ge=1, description="Steps between per-step metric records.")
    checkpoint_every_epochs: int = Field(1, ge=1, description="Epochs between checkpoints (the last epoch always saves).")

    @model_validator(mode="after")
    def _rules(self) -> TrainConfig:
        if self.compile_mode != "default" and not self.compile:
            raise_field_errors("train", [("compile_mode", "applies only with train.compile: true", self.compile_mode)])
        return self


def regime_key(keep_ratio: float) -> str:
    """A keep ratio's name in records, TensorBoard tags, sweep columns and tables: two decimals ("0.10")
    when they state it exactly, else Python's shortest exact form ("0.025"), so distinct keep ratios never
    share a name (0.025 and 0.03 would both be "0.03" at two decimals)."""
    two_decimals = f"{keep_ratio:.2f}"
    return two_decimals if float(two_decimals) == keep_ratio else repr(float(keep_ratio))


class EvalConfig(Section):
    keep_ratios: list[float] = Field(
        [1.0, 0.5, 0.3, 0.2, 0.1, 0.05], min_length=1, description="Keep ratios of the per-regime accuracy grid."
    )
    every_epochs: int = Field(1, ge=1, description="Epochs between evaluations (the last epoch always evaluates).")
    batch_size: int = Field(500, ge=1, description="Evaluation batch size per worker.")
    select_keep_ratio: float = Field(
        1.0, description="Model selection: the checkpoint with the best accuracy at this keep ratio (validation under "
        "heldout, test under paper)."
    )
    selection: Literal["heldout", "paper"] = Field(
        "heldout", description="heldout: select on a validation split held out of training (data.val_fraction > 0; the "
        "sound choice for studies). paper: train on every training image and select by test accuracy, as the released "
        "script does (its numbers are best-on-test); everything it selects is labelled so.",
    )
    precision: Literal["train", "fp32", "bf16", "fp16"] = Field(
        "train", description="Evaluation autocast dtype (CUDA only): train = train.precision; the released script "
        "evaluates in fp32.",
    )

    @model_validator(mode="after")
    def _rules(self) -> EvalConfig:
        problems = [("keep_ratios", "every keep ratio must be in (0, 1]", r) for r in self.keep_ratios if not 0 < r <= 1]
        if len(set(self.keep_ratios)) != len(self.keep_ratios):
            problems.append(("keep_ratios", "keep ratios must be distinct", self.keep_ratios))
        if self.select_keep_ratio not in self.keep_ratios:
            problems.append(("select_keep_ratio", f"must be one of keep_ratios {self.keep_ratios}", self.select_keep_ratio))
        raise_field_errors("eval", problems)
        return self


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also the FFCV/torch thread budget).")


class RunConfig(Section):
    name: str = Field("sparsedist", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (the Ray Train run name).")
    run_dir: str | None = Field(
        None, description="Run directory: a path (shared storage on clusters) or a URI such as s3://bucket/runs/x; "
        "default ./runs/<name>."
    )
    seed: int = Field(3407, ge=0, description="Seed of model init, data order and everything random.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may do after failures (a worker "
                              "crash, a host lost without notice; -1: unlimited).")
    max_preemption_failures: int = Field(
        -1, ge=-1, description="Restarts after preemptions (a node drained with notice, such as a spot reclaim), counted "
        "apart from run.max_failures (-1: unlimited: a preemption says nothing about the run).")
    preemption_check_steps: int = Field(
        50, ge=0, description="Steps between checks for a preemption notice (a node drained with a deadline); on one "
        "the run writes a checkpoint at that step, so a preempted host costs at most this many steps. Each check is "
        "a barrier across the workers (0: never check).")
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept on disk (the best by validation is kept too).")
    init_from: str | None = Field(
        None, description="Checkpoint directory a new run starts from: weights, optimizer, schedule, controller state "
        "and epoch continue from it, every setting comes from this config (PBT's exploit uses it). Ignored once the "
        "run has a checkpoint of its own.",
    )
    verbose: bool = Field(False, description="Also log Ray Train's per-report lines (\"Reporting training result ...\"); "
                          "`--verbose` sets it.")

    _abs_dir = field_validator("run_dir", "init_from")(classmethod(lambda cls, v: _absolute(v)))

    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.abspath(os.path.join("runs", self.name))


class TrackingConfig(Section):
    backend: Literal["none", "mlflow"] = Field(
        "none", description="Experiment tracking besides TensorBoard: mlflow logs the config as params, every metric "
        "under its TensorBoard name and step, and config, summary and figures as artifacts (one MLflow run per run "
        "directory, so one per sweep trial).",
    )
    uri: str | None = Field(
        None, description="MLflow tracking URI (http://127.0.0.1:5000, sqlite:///mlflow.db, ...); default: "
        "MLFLOW_TRACKING_URI, else MLflow's own default.",
    )
    experiment: str = Field("sparsedist", min_length=1, description="MLflow experiment the runs are logged to.")


# ------------------------------------------------------------------------------------- root
class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and loaders.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone.")
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig, description="Top-k constraint.")
    controller: ControllerConfig = Field(default_factory=DenseControllerConfig, description="Keep-ratio controller.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Per-regime evaluation.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity, seed and fault tolerance.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (MLflow).")

    @model_validator(mode="after")
    def _rules(self) -> Config:
        if self.data.loader_workers is None:
            # Loader threads follow the worker's allotment (Ray sets torch's threads to it too).
            self.data.loader_workers = max(1, int(self.scaling.cpus_per_worker))
        if self.data.val_fraction is None:
            self.data.val_fraction = DEFAULT_VAL_FRACTION if self.eval.selection == "heldout" else 0.0
        problems = []
        if self.train.batch_size % self.scaling.num_workers:
            problems.append(("train.batch_size", f"must be divisible by scaling.num_workers ({self.scaling.num_workers})",
                             self.train.batch_size))
        if self.eval.selection == "heldout" and self.data.val_fraction == 0:
            problems.append(("data.val_fraction", "eval.selection heldout selects on a validation split: set it > 0 "
                             "(or eval.selection: paper to train on every image and select on test)", 0.0))
        if self.eval.selection == "paper" and self.data.val_fraction > 0:
            problems.append(("data.val_fraction", "eval.selection paper trains on every training image: set it to 0",
                             self.data.val_fraction))
        raise_field_errors("config", problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------- loading
class ConfigError(Exception):
    """Invalid configuration; `problems` holds (dotted path, message, offending value) for every error."""

    def __init__(self, problems: list[tuple[str, str, Any]]):
        self.problems = problems
        super().__init__(self.format())

    def format(self) -> str:
        lines = [f"invalid configuration ({len(self.problems)} error{'s' * (len(self.problems) != 1)}):"]
        lines += [f"  {path}: {message} (got {value!r})" for path, message, value in self.problems]
        return "\n".join(lines)


def _dotted(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    # Discriminated unions insert the tag into the location: controller.adaptive.keep_min.
    if len(parts) > 1 and parts[0] == "controller" and parts[1] in STRATEGIES:
        del parts[1]
    return ".".join(parts) or "<root>"


def validate(data: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, raising ConfigError listing every problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append((_dotted(item["loc"]), message, value if not isinstance(value, dict) else "{...}"))
        raise ConfigError(problems) from None


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError([(origin, f"not valid YAML: {error}", None)]) from None
    if not isinstance(data, dict):
        raise ConfigError([(origin, "a config file must hold a mapping", type(data).__name__)])
    return data


def load_source(source: str) -> dict[str, Any]:
    """A YAML file path, a storage URI of one (a run's config.yaml on s3://...) or a preset name, as a plain
    dict (not validated)."""
    if storage.is_uri(source):
        try:
            return _read_yaml(storage.read_bytes(source).decode("utf-8"), source)
        except FileNotFoundError:
            raise ConfigError([("<config>", "no such file in storage", source)]) from None
    if os.path.isfile(source):
        return _read_yaml(Path(source).read_text(), source)
    if source in preset_names():
        return _read_yaml(resources.files(PRESETS_PACKAGE).joinpath(f"{source}.yaml").read_text(), source)
    raise ConfigError([("<config>", f"no such file or preset; presets: {', '.join(preset_names())}", source)])


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([("--set", "expected dotted.key=value", text)])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys on a nested dict. Switching controller.strategy drops the old strategy's fields."""
    pairs = list(overrides.items()) if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    pairs.sort(key=lambda pair: pair[0] != "controller.strategy")  # a strategy switch applies first
    result = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for key, value in pairs:
        if key == "controller.strategy" and (result.get("controller") or {}).get("strategy") != value:
            result["controller"] = {}
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return result


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` laid over `base`: nested sections merge key by key, other values replace; a controller
    section naming another strategy replaces the whole section (as `--set controller.strategy=` does)."""
    result = dict(base)
    for key, value in top.items():
        switches_strategy = key == "controller" and isinstance(value, dict) and "strategy" in value and (
            (base.get("controller") or {}).get("strategy") != value["strategy"])
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not switches_strategy:
            result[key] = overlay(base[key], value)
        else:
            result[key] = value
    return result


def load_sources(sources: str | Sequence[str] | None) -> dict[str, Any]:
    """One or more YAML files, storage URIs or preset names (`--config`, repeatable), each laid over the
    ones before it, as a plain dict (not validated); none: {} (the defaults)."""
    if sources is None:
        return {}
    data: dict[str, Any] = {}
    for source in [sources] if isinstance(sources, str) else sources:
        data = overlay(data, load_source(source))
    return data


def load_config(sources: str | Sequence[str] | None = None, overrides: list[str] | dict[str, Any] = ()) -> Config:
    """Load YAML files or presets laid over one another (or the defaults), apply --set overrides, validate."""
    return validate(apply_overrides(load_sources(sources), overrides))


CONFIG_HELP = ("YAML file, storage URI or preset name; repeatable: each laid over the ones before it (e.g. "
               "--config paper-s2 --config gpu-4), then --set")


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False, help: str = CONFIG_HELP) -> None:
    """`--config` (repeatable overlays) and `--set`: the one config grammar of every command."""
    parser.add_argument("--config", action="append", required=required, metavar="CONFIG", help=help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted config key (value parsed as YAML); repeatable, applied last")


def reference_markdown() -> str:
    """The config reference table for the README (`sparsedist config reference`); a test keeps them in sync."""

    def rows(section: type[Section], prefix: str) -> list[str]:
        lines = []
        for name, info in section.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
                lines += rows(info.annotation, f"{prefix}{name}.")
            elif not (name == "controller" or (prefix == "controller." and name == "strategy")):
                default = info.get_default(call_default_factory=True)
                lines.append(f"| `{prefix}{name}` | `{default}` | {info.description} |")
        return lines

    lines = ["| key | default | meaning |", "|---|---|---|", *rows(Config, "")]
    for strategy in (DenseControllerConfig, FixedControllerConfig, CyclicControllerConfig, AdaptiveControllerConfig):
        tag = strategy.model_fields["strategy"]
        lines.append(f"| `controller.strategy: {tag.default}` | | {tag.description} |")
        lines += rows(strategy, "controller.")
    return "\n".join(lines) + "\n"
