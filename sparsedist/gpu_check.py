"""`make gpu-check`: the one command for a GPU machine. Writes gpu-check.json and gpu-check.txt.

Runs as-is with the machine's own python3 (torch, triton, numpy, scipy, pyyaml, pytest): packages it
lacks (pydantic and its dependencies) are installed from `wheels/` (`make gpu-wheels` fills it on a
machine with network; the folder travels with the tree) by `pip install --no-index --target` into
the output folder. Neither Ray nor FFCV is needed. Without CUDA it says so and exits with status 2
before doing anything.

Stages, each a subprocess with a time limit taken from what is left of `--budget` seconds, so a
stage that hangs or crashes costs only itself; the JSON is rewritten after every stage:

1. tests: `pytest -m gpu tests/test_gpu.py` (kernels vs the eager reference, bf16 autocast,
   channels_last, a compiled model, resume of the training loop, determinism of tau);
2. sites: the kernels vs `torch.topk` + scatter and vs the eager path on the WRN-28-4 site shapes;
3. steps: WRN-28-4 train steps, batch 128, bf16, channels_last, eager: dense images/s and every
   variant as x dense in the same run;
4. steps_compiled: the same with torch.compile'd dense and both scopes (compilation in warm-up).

This module imports only the standard library at the top, so it can refuse cleanly anywhere.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules the method core imports that the GPU machine lacks (import name; the wheels bring their dependencies).
NEEDED_MODULES = ("pydantic",)
BUDGET_S = 460  # of the 8 minutes the check may take: leaves start-up and a margin
STAGE_LIMIT_S = {"tests": 170, "sites": 30, "steps": 60}  # steps_compiled gets what is left (3 compilations)
BENCHMARK = {"batch_size": 128, "keep_ratio": 0.1, "depth": 28, "widen_factor": 4}


def cuda_problem() -> str | None:
    """Why this machine cannot run the check, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def install_missing(wheel_dir: str, target: str, needed: tuple[str, ...] = NEEDED_MODULES) -> list[str]:
    """pip-install every wheel of `wheel_dir` into `target` if a `needed` module is missing; the wheel names.

    The wheels are installed as files (no index, no resolver downloads), so the set is exactly what
    `make gpu-wheels` fetched. `target` is put first on sys.path (and on PYTHONPATH for the stages).
    """
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        raise SystemExit(f"missing {', '.join(missing)} and no wheels in {wheel_dir}: run `make gpu-wheels` on a "
                         "machine with network and bring the folder along")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--target", target, *wheels],
                   check=True)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return [os.path.basename(wheel) for wheel in wheels]


def _environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability())}


# ----------------------------------------------------------------------------------- stages
def stage_tests(out_dir: str) -> dict:
    report = os.path.join(out_dir, "gpu-tests.xml")
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "exit_code": done.returncode, "output_tail": done.stdout[-3000:]}


def stage_sites(out_dir: str) -> dict:
    import torch

    from sparsedist.bench.sparsity import run_site_benchmark

    return run_site_benchmark(device="cuda", dtype=torch.bfloat16, channels_last=True, **BENCHMARK)


def stage_steps(out_dir: str, compile: bool = False) -> dict:
    from sparsedist.bench.sparsity import run_sparsity_benchmark

    return run_sparsity_benchmark(device="cuda", bf16=True, channels_last=True, compile=compile, repeats=20,
                                  warmup=3, **BENCHMARK)


STAGES = {"tests": stage_tests, "sites": stage_sites, "steps": stage_steps,
          "steps_compiled": lambda out_dir: stage_steps(out_dir, compile=True)}


# ------------------------------------------------------------------------------ orchestration
def _run_stage(name: str, out_dir: str, env: dict, limit_s: float) -> dict:
    part = os.path.join(out_dir, f"{name}.json")
    start = time.monotonic()
    # Its own process group: on a time-out the stage's children (the tests stage's pytest) end with it
    # instead of sharing the GPU with the next stage.
    stage = subprocess.Popen([sys.executable, "-m", "sparsedist.gpu_check", "--stage", name, "--out", out_dir],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = stage.communicate(timeout=max(limit_s, 1))
        status = "ok" if stage.returncode == 0 and os.path.exists(part) else f"failed (exit {stage.returncode})"
        log = stdout[-2000:] + stderr[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.communicate()
        status, log = f"timed out after {limit_s:.0f} s", ""
    result = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    if os.path.exists(part):
        with open(part, encoding="utf-8") as handle:
            result["result"] = json.load(handle)
    if status != "ok":
        result["log_tail"] = log
    return result


def _summary(report: dict) -> str:
    environment = report["environment"]
    lines = [f"gpu-check: {environment['device']} (sm_{''.join(map(str, environment['capability']))}), torch "
             f"{environment['torch']}, CUDA {environment['cuda']}, triton {environment['triton']}"]
    for name, stage in report["stages"].items():
        lines.append(f"{name}: {stage['status']} in {stage['seconds']} s")
        result = stage.get("result", {})
        if name == "tests" and result:
            lines.append(f"  {result['passed']} passed, {result['failures'] + result['errors']} failed, "
                         f"{result['skipped']} skipped {' '.join(result['failed'])}")
        elif name == "sites" and result:
            for scope, row in result["total"].items():
                lines.append(f"  {scope}: kernels {row['kernel_ms']:.2f} ms for all sites, "
                             + ", ".join(f"{other} {row[f'{other}_ms'] / row['kernel_ms']:.1f}x slower"
                                         for other in row["compared"]))
        elif result:
            lines.append("  " + ", ".join(f"{variant} {ratio:.3f}x" for variant, ratio in result["ratio_to_dense"].items()))
            lines.append(f"  dense {result['images_per_s']['dense']:.0f} images/s"
                         + (f", compiled {result['images_per_s']['dense_compiled']:.0f}" if "dense_compiled"
                            in result["images_per_s"] else ""))
    return "\n".join(lines) + "\n"


def run_check(out_dir: str, wheel_dir: str, budget_s: float) -> int:
    problem = cuda_problem()
    if problem:
        print(f"gpu-check needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    deadline = time.monotonic() + budget_s
    os.makedirs(out_dir, exist_ok=True)
    site_dir = os.path.join(out_dir, "site-packages")
    installed = install_missing(wheel_dir, site_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site_dir, REPO, os.environ.get("PYTHONPATH")])),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS for the bitwise tests
    report = {"environment": {**_environment(), "installed_wheels": installed}, "stages": {}}
    for name in STAGES:
        left = deadline - time.monotonic()
        report["stages"][name] = _run_stage(name, out_dir, env, min(STAGE_LIMIT_S.get(name, left), left))
        with open(os.path.join(out_dir, "gpu-check.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    summary = _summary(report)
    with open(os.path.join(out_dir, "gpu-check.txt"), "w", encoding="utf-8") as handle:
        handle.write(summary)
    print(summary, end="")
    return 0 if all(stage["status"] == "ok" for stage in report["stages"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m sparsedist.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu-check"),
                        help="folder for gpu-check.json and gpu-check.txt (default: $OUT, else ./gpu-check)")
    parser.add_argument("--wheels", default=os.path.join(REPO, "wheels"), help="wheels of the missing packages")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)  # one stage, in a subprocess
    args = parser.parse_args(argv)
    if args.stage is None:
        return run_check(os.path.abspath(args.out), args.wheels, args.budget)
    result = STAGES[args.stage](args.out)
    with open(os.path.join(args.out, f"{args.stage}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    return 1 if result.get("exit_code") else 0  # failed tests fail their stage


if __name__ == "__main__":
    sys.exit(main())
