"""`sparsedist` command line. Each subcommand imports its machinery lazily so `config validate` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from sparsedist.config import CONFIG_HELP, ConfigError, add_config_arguments, load_config
from sparsedist.extras import MissingExtraError, require
from sparsedist.provenance import package_version

EXIT_CONFIG = 2



def cmd_config_validate(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    from sparsedist.config import preset_names

    print("\n".join(preset_names()))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from sparsedist.config import reference_markdown

    print(reference_markdown(), end="")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    require("train", "sparsedist data prepare")
    from sparsedist.data import DataUnavailableError, prepare
    from sparsedist.storage import StorageError

    overrides = [f"data.dataset={args.dataset}"] + ([f"data.root={args.root}"] if args.root else [])
    if args.source:
        overrides.append(f"data.source={args.source}")
    cfg = load_config(args.config, overrides + args.overrides)
    try:
        paths = prepare(cfg.data, log=print)
    except DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except StorageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    for split in ("train", "val", "test"):
        if getattr(paths, split) is not None:
            print(f"{split:5s} {paths.counts[split]:>7d} examples  {getattr(paths, split)}")
    return 0


def cmd_bench_sparsity(args: argparse.Namespace) -> int:
    from sparsedist.bench.sparsity import run_sparsity_benchmark

    run_sparsity_benchmark(json_out=args.json, threads=args.threads, compile=args.compile)
    return 0


def cmd_bench_inference(args: argparse.Namespace) -> int:
    from sparsedist.bench.inference import run_inference_benchmark
    from sparsedist.export.artifact import ArtifactError

    try:
        run_inference_benchmark(args.export_dir, repeats=args.repeats, threads=args.threads, json_out=args.json)
    except ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    require("train", "sparsedist bench data")
    from sparsedist.bench.data import run_data_benchmark

    run_data_benchmark(json_out=args.json)
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    require("tune", "sparsedist bench sweep")
    from sparsedist.bench.sweep import run_sweep_benchmark

    run_sweep_benchmark(trials=args.trials, json_out=args.json)
    return 0


# Commands whose flags live beside their (heavy) implementation: (extra, module, add-arguments, run, help).
# Only the invoked one is imported, so `sparsedist config validate` never loads torch, Ray or FFCV.
RUNNERS = {
    "train": ("train", "sparsedist.launch.train", "add_train_arguments", "train_from_args",
              "train through Ray Train (embedded local Ray, or the cluster RAY_ADDRESS names)"),
    "tune": ("tune", "sparsedist.launch.tune", "add_tune_arguments", "tune_from_args",
             "Ray Tune sweep over a search space (each trial a Ray Train run)"),
    "reproduce": ("tune", "sparsedist.launch.reproduce", "add_reproduce_arguments", "reproduce_from_args",
                  "the paper's table with confidence intervals: dense, Strategy 1, Strategy 2 x seeds as a sweep"),
    "report": ("report", "sparsedist.report.page", "add_report_arguments", "report_from_args",
               "figures and a markdown page for run or sweep directories"),
    "eval": ("train", "sparsedist.report.evaluate", "add_eval_arguments", "eval_from_args",
             "per-regime accuracy table of a checkpoint"),
    "export": ("train", "sparsedist.export.export", "add_export_arguments", "export_from_args",
               "write a checkpoint as a self-contained model directory (safetensors, config.json, model card)"),
    "demo": ("train", "sparsedist.launch.demo", "add_demo_arguments", "demo_from_args",
             "a short 2-worker Ray Train run on offline data (make demo)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedist", description="Activation-sparsity regime training on Ray.")
    parser.add_argument("--version", action="version", version=f"sparsedist {package_version('sparsedist') or 'unknown (a source tree, not installed)'}")
    commands = parser.add_subparsers(dest="command", required=True)
    invoked = next((arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")), None)
    for name, (extra, module_name, add_arguments, run, help_text) in RUNNERS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == invoked:
            require(extra, f"sparsedist {name}")
            module = importlib.import_module(module_name)
            getattr(module, add_arguments)(sub)
            sub.set_defaults(func=getattr(module, run))

    config = commands.add_parser("config", help="inspect configurations").add_subparsers(dest="action", required=True)
    validate = config.add_parser("validate", help="print the resolved YAML, or every error (exit 2)")
    add_config_arguments(validate)
    validate.set_defaults(func=cmd_config_validate)
    config.add_parser("list", help="print the preset names").set_defaults(func=cmd_config_list)
    config.add_parser("reference", help="print the config reference table (markdown)").set_defaults(func=cmd_config_reference)

    data = commands.add_parser("data", help="dataset preparation").add_subparsers(dest="action", required=True)
    prepare = data.add_parser("prepare", help="write train/val/test .beton files once")
    prepare.add_argument("--dataset", required=True, help="synthetic, cifar10, cifar100 or fashion-mnist")
    prepare.add_argument("--root", help="directory for .beton files and downloads")
    prepare.add_argument("--source", help="already-downloaded archive or folder to read")
    add_config_arguments(prepare, help="base config (synthetic and validation-split settings); " + CONFIG_HELP)
    prepare.set_defaults(func=cmd_data_prepare)

    bench = commands.add_parser("bench", help="benchmarks (not tests)").add_subparsers(dest="action", required=True)
    for name, func in (("sparsity", cmd_bench_sparsity), ("data", cmd_bench_data), ("inference", cmd_bench_inference),
                       ("sweep", cmd_bench_sweep)):
        sub = bench.add_parser(name)
        sub.add_argument("--json", metavar="OUT", help="also write the figures as a JSON object")
        sub.set_defaults(func=func)
        if name in ("sparsity", "inference"):
            sub.add_argument("--threads", type=int, help="torch threads (1 gives steadier figures on a shared machine)")
        if name == "sparsity":
            sub.add_argument("--compile", action="store_true", help="also time torch.compile'd dense and both scopes")
        if name == "inference":
            sub.add_argument("export_dir", help="a `sparsedist export` directory")
            sub.add_argument("--repeats", type=int, default=20, help="timed runs per path and batch size (median)")
        if name == "sweep":
            sub.add_argument("--trials", type=int, default=3, help="one-epoch smoke trials, run one at a time (>= 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except ConfigError as error:
        print(error.format(), file=sys.stderr)
        return EXIT_CONFIG
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
