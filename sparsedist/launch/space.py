"""Search spaces: YAML files mapping dotted `Config` paths to distributions, checked before a sweep starts.

    controller.tighten_pct: {loguniform: [0.005, 0.1]}
    controller.interval: {choice: [16, 32, 64]}
    run.seed: {grid: [0, 1, 2]}
    controller:                      # labelled options: a mapping label -> value; Tune samples the label
      grid: {dense: {strategy: dense}, s1: {preset: paper-s1}, fast: {strategy: adaptive, tighten_pct: 0.1}}

Distributions: choice and grid take a list of values or a mapping of labels to values (needed for
whole sections; an option `{preset: NAME}` stands for that preset's value at the same path); uniform, loguniform and quniform take [low, high] and [low, high, q]; randint takes
[low, high) like Tune. A trial's config is the base config, then `--set` overrides, then the sampled
values (a section-valued path replaces that section). `check_space` validates the corner values of
every dimension against `Config` and the metric the sweep optimizes, so a bad space fails with one
error listing every problem before any trial starts.
"""

from __future__ import annotations

import difflib
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from sparsedist.config import Config, ConfigError, apply_overrides, load_source, regime_key, validate
from sparsedist.logging import flatten_epoch

OPTION_KINDS = ("choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint", "quniform")
# Paths the sweep itself sets for every trial: sampling them would break the run layout.
SWEEP_OWNED_PATHS = ("run.name", "run.run_dir")
# Above this many corner combinations, a covering subset is checked (every corner value at least once).
MAX_CORNER_COMBINATIONS = 4096


class SpaceError(ConfigError):
    """An invalid search space; `problems` holds (path, message, value) like ConfigError."""

    def format(self) -> str:
        return super().format().replace("invalid configuration", "invalid search space", 1)


@dataclass(frozen=True)
class Dimension:
    """One sampled config path. For choice/grid, `options` holds what Tune samples (labels, when given)."""

    path: str
    kind: str
    options: tuple[Any, ...] = ()
    labelled: dict[str, Any] | None = None  # label -> config value
    low: float = 0.0
    high: float = 0.0
    q: float = 1.0

    def corners(self) -> list[Any]:
        """The extreme values Tune can sample (all of them, for options), as Tune returns them."""
        if self.kind in OPTION_KINDS:
            return list(self.options)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]  # Tune's upper bound is exclusive
        return [self.low, self.high]

    def config_value(self, sampled: Any) -> Any:
        """The config value behind a sampled value (a label becomes its option)."""
        return self.labelled[sampled] if self.labelled is not None else sampled

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.options))
        if self.kind == "choice":
            return tune.choice(list(self.options))
        if self.kind == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](self.low, self.high)

    def mutation(self):
        """What PBT's explore draws from: the option list (it shifts to a neighbour or resamples), or the range as
        a Tune domain (it scales the value by 0.8 or 1.2, or resamples)."""
        return list(self.options) if self.kind in OPTION_KINDS else self.to_tune()

    def clip(self, value: Any) -> Any:
        """A value PBT scaled, back inside the range (Tune's explore does not clip)."""
        if self.kind in OPTION_KINDS:
            return value
        value = min(max(value, self.low), self.high - 1 if self.kind == "randint" else self.high)
        return round(value / self.q) * self.q if self.kind == "quniform" else value


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def paths(self) -> list[str]:
        return [d.path for d in self.dimensions]

    def to_tune(self) -> dict[str, Any]:
        """Tune's param_space: flat dotted keys, so each trial's config is {path: sampled value}."""
        return {d.path: d.to_tune() for d in self.dimensions}

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """A trial's sampled values as config overrides ({path: config value})."""
        return {d.path: d.config_value(sampled[d.path]) for d in self.dimensions}

    @property
    def mutated(self) -> tuple[Dimension, ...]:
        """The dimensions PBT mutates: every one but the grids (a grid only lays out the population)."""
        return tuple(d for d in self.dimensions if d.kind != "grid")

    def mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations."""
        return {d.path: d.mutation() for d in self.mutated}

    def clip(self, config: dict[str, Any]) -> dict[str, Any]:
        """PBT's custom_explore_fn: a perturbed trial config with every mutated value inside its range."""
        return {**config, **{d.path: d.clip(config[d.path]) for d in self.mutated}}

    def corner_combinations(self) -> list[dict[str, Any]]:
        corners = [d.corners() for d in self.dimensions]
        if math.prod(len(c) for c in corners) <= MAX_CORNER_COMBINATIONS:
            combos = itertools.product(*corners)
        else:
            # Too many to try all: the i-th combination takes each dimension's (i mod len)-th corner.
            combos = (tuple(c[i % len(c)] for c in corners) for i in range(max(len(c) for c in corners)))
        return [dict(zip(self.paths, combo)) for combo in combos]


# ------------------------------------------------------------------------------------ parsing
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _preset_value(path: str, option: Any) -> Any:
    """An option `{preset: NAME}` is the value at `path` in that preset (so sweeps reuse presets verbatim)."""
    if not (isinstance(option, dict) and set(option) == {"preset"}):
        return option
    node = load_source(option["preset"])
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SpaceError([(path, f"preset {option['preset']!r} does not set this path", option)])
        node = node[part]
    return node


def _parse_dimension(path: str, spec: Any) -> tuple[Dimension | None, list[tuple[str, str, Any]]]:
    if not isinstance(spec, dict) or len(spec) != 1:
        return None, [(path, f"expected one distribution, a mapping like {{uniform: [low, high]}}; kinds: "
                             f"{', '.join(OPTION_KINDS + RANGE_KINDS)}", spec)]
    kind, args = next(iter(spec.items()))
    if kind in OPTION_KINDS:
        if isinstance(args, dict) and args and all(isinstance(label, str) for label in args):
            try:
                labelled = {label: _preset_value(path, option) for label, option in args.items()}
            except ConfigError as error:
                return None, error.problems
            return Dimension(path, kind, options=tuple(args), labelled=labelled), []
        if isinstance(args, list) and args:
            if any(isinstance(option, dict) for option in args):
                return None, [(path, f"{kind}: give mapping options labels ({kind}: {{label: value, ...}})", args)]
            return Dimension(path, kind, options=tuple(args)), []
        return None, [(path, f"{kind}: expected a non-empty list of values or a mapping of string labels to values", args)]
    if kind not in RANGE_KINDS:
        return None, [(path, f"unknown distribution {kind!r}; kinds: {', '.join(OPTION_KINDS + RANGE_KINDS)}", kind)]
    arity = 3 if kind == "quniform" else 2
    form = "[low, high, q]" if kind == "quniform" else "[low, high]"
    if not isinstance(args, list) or len(args) != arity or not all(_is_number(a) for a in args):
        return None, [(path, f"{kind}: expected {form} numbers", args)]
    low, high, *rest = args
    q = rest[0] if rest else 1
    problems = []
    if not low < high:
        problems.append((path, f"{kind}: low must be < high", args))
    if kind == "loguniform" and low <= 0:
        problems.append((path, "loguniform: low must be > 0", args))
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        problems.append((path, "randint: bounds must be integers (high is exclusive)", args))
    if kind == "quniform" and q <= 0:
        problems.append((path, "quniform: q must be > 0", args))
    if not problems and kind == "quniform" and not all(math.isclose(b / q, round(b / q)) for b in (low, high)):
        problems.append((path, f"quniform: low and high must be multiples of q={q} (Tune requires it)", args))
    dimension = Dimension(path, kind, low=low, high=high, q=q)
    return (None, problems) if problems else (dimension, [])


def parse_space(data: Any, origin: str = "<space>") -> SearchSpace:
    """A search space from its plain-data form; SpaceError lists every format problem."""
    if not isinstance(data, dict) or not data:
        raise SpaceError([(origin, "a search space must be a non-empty mapping of dotted config paths to distributions",
                           data)])
    known = config_paths()
    dimensions, problems = [], []
    for path, spec in data.items():
        path = str(path)
        if path in SWEEP_OWNED_PATHS:
            problems.append((path, "set by the sweep for every trial; it cannot be sampled", spec))
        elif path not in known:
            close = difflib.get_close_matches(path, sorted(known), n=3)
            problems.append((path, "no such config path" + (f"; did you mean {', '.join(close)}?" if close else ""), spec))
        dimension, dimension_problems = _parse_dimension(path, spec)
        problems += dimension_problems
        if dimension is not None:
            dimensions.append(dimension)
    if problems:
        raise SpaceError(problems)
    return SearchSpace(tuple(dimensions))


def load_space(path: str) -> SearchSpace:
    """Read and parse a search-space YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SpaceError([(path, f"cannot read the search space: {error.strerror}", None)]) from None
    except yaml.YAMLError as error:
        raise SpaceError([(path, f"not valid YAML: {error}", None)]) from None
    return parse_space(data, origin=path)


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The Config sections an annotation can hold (through Union and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _section_models(arg)]


def config_paths(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every dotted path in the Config tree, sections included (union members contribute all their fields)."""
    paths = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        paths.add(path)
        for section in _section_models(field.annotation):
            paths |= config_paths(section, path + ".")
    return paths


# --------------------------------------------------------------------------------- checking
def reported_metrics(cfg: Config) -> set[str]:
    """The metric names every epoch report of a run with this config carries (its evaluation epochs)."""
    keep = dict.fromkeys((regime_key(r) for r in cfg.eval.keep_ratios), 0.0)
    has_val = cfg.data.val_fraction > 0
    record = {
        "epoch": 0, "step": 0, "train_loss": 0.0, "train_accuracy": 0.0, "keep_ratio": 1.0, "threshold": None,
        "realized_keep": 1.0, "lr": 0.0, "images_per_sec": 0.0, "nonfinite_steps": 0,
        "eval": {"val": keep, "test": keep} if has_val else {"test": keep},
        "eval_current": {"keep_ratio": 1.0, "test": 0.0, **({"val": 0.0} if has_val else {})},
        "best_val_accuracy": 0.0 if cfg.eval.selection == "heldout" else None,
        "best_test_accuracy": 0.0 if cfg.eval.selection == "paper" else None,
    }
    return set(flatten_epoch(record))


def check_space(space: SearchSpace, base: dict[str, Any], metric: str) -> list[Config]:
    """Validate every corner combination of the space over `base` (base config with --set applied).

    Returns the validated corner configs; raises SpaceError listing each distinct problem once, with an
    example of the sampled values that cause it. Also checks that each corner config reports `metric`
    on every epoch (ASHA and the trial ranking read it per epoch).
    """
    problems: dict[tuple[str, str], tuple[str, str, Any]] = {}
    configs = []
    for combo in space.corner_combinations():
        sampled = ", ".join(f"{path}={value!r}" for path, value in combo.items())
        try:
            cfg = validate(apply_overrides(base, space.overrides(combo)))
        except ConfigError as error:
            for path, message, value in error.problems:
                problems.setdefault((path, message), (path, f"{message} [when {sampled}]", value))
            continue
        configs.append(cfg)
        if metric.startswith("eval/val/") and cfg.eval.selection == "paper":
            problems.setdefault(("metric", "paper"), (
                "eval.selection", f"the sweep metric {metric} needs a validation split, and this base trains on every "
                "image and selects on the test set (the paper protocol); a sweep should select on held-out data: "
                "--set eval.selection=heldout", cfg.eval.selection))
        elif metric not in reported_metrics(cfg):
            choices = ", ".join(sorted(m for m in reported_metrics(cfg) if m.startswith("eval/")))
            problems.setdefault(("metric", ""), ("--metric", f"no trial reports this metric [when {sampled}]; "
                                                             f"evaluation metrics: {choices}", metric))
        elif metric.startswith("eval/") and cfg.eval.every_epochs != 1:
            problems.setdefault(("metric", "every"), ("eval.every_epochs", f"the sweep metric {metric} is read every "
                                                      "epoch, so evaluation must run every epoch (set it to 1)",
                                                      cfg.eval.every_epochs))
    if problems:
        raise SpaceError(list(problems.values()))
    return configs
