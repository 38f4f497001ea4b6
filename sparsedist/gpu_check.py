"""`make gpu-check`: the one command for a GPU machine; every figure comes back in at most four files.

The output folder ($OUT) receives only its results, written as they come: gpu-check.json (rewritten
after every stage), gpu-check.txt (the summary, also printed), gpu-tests.log (pytest's verbose output,
streamed, so a hang names the test it hung in) and gpu-tests.xml (JUnit). Installs and scratch go to a
temporary folder: the GPU machine hands back at most 8 files, two folders down.

Runs with the machine's own python3 (torch, triton, numpy, scipy, pyyaml, pytest): what it lacks
(pydantic and its dependencies) comes from `wheels/`, filled by `make gpu-wheels` on a machine with a
network and carried along with the tree; the check refuses up front, naming that command, when they are
missing. Neither Ray nor FFCV is needed. Without CUDA it says so and exits with status 2 before doing
anything, unless `--dry-run`: the whole script on CPU, kernels in Triton's interpreter, tiny shapes (the
suite runs it, so the script itself is tested on every change).

Stages, each a subprocess with a time limit taken from what is left of `--budget` seconds, so a stage
that hangs or crashes costs only itself:
1. tests: `pytest -m gpu tests/test_gpu.py -v`. A test that hangs (killed at the stage's limit, its
   stack dumped by faulthandler) or dies of a CUDA fault (which poisons the process's context) is
   recorded, and the tests after it run again in a fresh process while time is left;
2. sites: the kernels vs their `torch.topk` references and vs the eager path on the WRN-28-4 site shapes;
3. steps: WRN-28-4 train steps, batch 128, bf16, channels_last, eager, cuDNN deterministic as in
   training: dense images/s and every variant as x dense in the same run;
4. steps_fp16: the same in fp16 (the paper's precision);
5. steps_cudnn_benchmark: the same as 3 with cuDNN's autotuner (the released script's setting);
6. steps_compiled: 3 with torch.compile'd dense and both scopes (compilation in warm-up);
7. steps_cuda_graphs: 6 in mode reduce-overhead (`train.compile_mode`), each step a CUDA graph replay.
The summary ends with issue 20's targets, each met, MISSED, or not judged (no figure, or a dry run).

This module imports only the standard library at the top, so it can refuse cleanly anywhere.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules the method core imports that the GPU machine lacks (import name; the wheels bring their dependencies).
NEEDED_MODULES = ("pydantic",)
BUDGET_S = 460  # of the 8 minutes the check may take: leaves start-up and a margin
# A step benchmark is ~100 steps plus CUDA and Triton start-up. The two compiled stages have no limit of
# their own: they share what the others left, equally. Each compiles WRN-28-4 three times, and a cold
# compilation of its forward and backward takes 26-34 s on this project's 2-core CPU machines (CPU
# inductor): the longest stages, and the least predictable.
STAGE_LIMIT_S = {"tests": 150, "sites": 30, "steps": 45, "steps_fp16": 45, "steps_cudnn_benchmark": 45}
TEST_LIMIT_S = 90  # one GPU test (its compilations included) running longer is killed, and the rest go on
BENCHMARK = {"batch_size": 128, "keep_ratio": 0.1, "depth": 28, "widen_factor": 4}
DRY_RUN_BENCHMARK = {"batch_size": 2, "keep_ratio": 0.1, "depth": 10, "widen_factor": 1, "image_size": 8}
RESULT_FILES = ("gpu-check.json", "gpu-check.txt", "gpu-tests.log", "gpu-tests.xml")  # all that goes to $OUT
TEST_FILE = "tests/test_gpu.py"
# Errors after which the process's CUDA context is unusable: later tests must run in a fresh process.
CUDA_FAULT = re.compile(r"illegal memory access|device-side assert|CUDA error|unspecified launch failure", re.I)
OUTCOME_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def cuda_problem() -> str | None:
    """Why this machine cannot run the check, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def missing_modules(needed: tuple[str, ...] = NEEDED_MODULES) -> list[str]:
    return [name for name in needed if importlib.util.find_spec(name) is None]


def wheels_problem(wheel_dir: str, needed: tuple[str, ...] = NEEDED_MODULES) -> str | None:
    """Why the missing modules cannot be installed, or None (nothing missing, or wheels at hand)."""
    missing = missing_modules(needed)
    if missing and not glob.glob(os.path.join(wheel_dir, "*.whl")):
        return (f"this python lacks {', '.join(missing)} and {wheel_dir} holds no wheels: run `make gpu-wheels` on a "
                "machine with a network and bring the folder along (the device tool: carry [\"wheels\"])")
    return None


def install_missing(wheel_dir: str, target: str, needed: tuple[str, ...] = NEEDED_MODULES) -> list[str]:
    """pip-install every wheel of `wheel_dir` into `target` if a `needed` module is missing; the wheel names.

    The wheels are installed as files (no index, no resolver downloads), so the set is exactly what
    `make gpu-wheels` fetched. `target` is put first on sys.path (and on PYTHONPATH for the stages).
    """
    if not missing_modules(needed):
        return []
    problem = wheels_problem(wheel_dir, needed)
    if problem:
        raise SystemExit(problem)
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--target", target, *wheels],
                   check=True)
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return [os.path.basename(wheel) for wheel in wheels]


def _environment(dry_run: bool) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = ("cpu (dry run: Triton's interpreter, tiny shapes)", [0, 0]) if dry_run else (
        torch.cuda.get_device_name(), list(torch.cuda.get_device_capability()))
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "device": device[0], "capability": device[1], "dry_run": dry_run}


# ------------------------------------------------------------------------------- the tests stage
def _collect(env: dict, test_file: str, cwd: str) -> tuple[list[str], str]:
    """The GPU tests' ids, and pytest's output (for a collection that finds none)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", test_file, "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return [line.strip() for line in done.stdout.splitlines() if "::" in line], done.stdout[-2000:] + done.stderr[-2000:]


def _junit_cases(path: str) -> dict[str, ElementTree.Element]:
    """Test id -> its <testcase> in a JUnit file (pytest writes one only when it exits normally)."""
    if not os.path.exists(path):
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '')}": case
            for case in suite.iter("testcase")}


def _outcome(case: ElementTree.Element) -> dict:
    for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            return {"outcome": outcome, "message": ((found.get("message") or "") + "\n" + (found.text or ""))[-1500:]}
    return {"outcome": "passed", "message": ""}


def _finished(log_text: str) -> dict[str, str]:
    """Test id -> outcome of every test a verbose pytest log reports as finished."""
    return {m.group(1): m.group(2).lower() for line in log_text.splitlines() if (m := OUTCOME_LINE.match(line))}


def _outcomes_from_log(log_text: str, pending: list[str], outcome: str, message: str) -> dict[str, dict]:
    """An interrupted run's results, from its verbose log: the finished tests, and the one it stopped in."""
    finished = _finished(log_text)
    outcomes = {test_id: {"outcome": result, "message": "(from the log)"} for test_id, result in finished.items()}
    running = next((test_id for test_id in pending if test_id not in finished), None)
    if running is not None:
        outcomes[running] = {"outcome": outcome, "message": message}
    return outcomes


def _wait_for_progress(run: subprocess.Popen, log_path: str, start: int, deadline: float, test_limit_s: float) -> float:
    """Wait for a pytest run to end; kill it (and its children) once one test takes `test_limit_s` or the
    deadline passes. Returns the limit it was killed at, 0 if it ended by itself."""
    last_progress, partial = time.monotonic(), ""
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(start)
        while run.poll() is None:
            now = time.monotonic()
            *lines, partial = (partial + log.read()).split("\n")  # the last piece may be half-written
            if _finished("\n".join(lines)):  # a test finished since the last look
                last_progress = now
            if now - last_progress > test_limit_s or now > deadline:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                return min(test_limit_s, now - last_progress)
            time.sleep(0.5)
    return 0.0


def run_gpu_tests(out_dir: str, scratch: str, env: dict, deadline: float, test_file: str = TEST_FILE,
                  cwd: str = REPO, test_limit_s: float = TEST_LIMIT_S) -> dict:
    """Every GPU test once, in as few processes as faults allow; the log and JUnit go to out_dir as they come.

    A test that runs `test_limit_s` without finishing is killed with its process (faulthandler writes its
    stack to the log first) and the tests after it run in a fresh one; so do the tests after one that dies
    of a CUDA fault, whose results in the poisoned process are dropped. A run cut at the deadline keeps
    what its log shows.
    """
    log_path, junit_path = os.path.join(out_dir, "gpu-tests.log"), os.path.join(out_dir, "gpu-tests.xml")
    pending, collect_output = _collect(env, test_file, cwd)
    outcomes: dict[str, dict] = {}
    cases: dict[str, ElementTree.Element] = {}
    runs = 0
    while pending and deadline - time.monotonic() > 5:
        runs += 1
        run_junit = os.path.join(scratch, f"tests-{runs}.xml")
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"===== pytest run {runs}: {len(pending)} tests =====\n")
            log.flush()
            start = log.tell()
            stack_dump_s = max(1, int(test_limit_s * 2 / 3))  # before the kill, so the stack reaches the log
            run = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                    "-o", f"faulthandler_timeout={stack_dump_s}", f"--junitxml={run_junit}",
                                    *pending], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        killed_at = _wait_for_progress(run, log_path, start, deadline, test_limit_s)
        run_cases = {} if killed_at else _junit_cases(run_junit)
        if run_cases:
            results = {test_id: _outcome(case) for test_id, case in run_cases.items()}
        else:
            outcome, message = (("timed out", f"killed after {killed_at:.0f} s without finishing: its stack is in "
                                 "gpu-tests.log (faulthandler)") if killed_at else
                                ("error", f"the pytest process died (exit {run.returncode}) in this test"))
            with open(log_path, encoding="utf-8", errors="replace") as log:
                log.seek(start)
                results = _outcomes_from_log(log.read(), pending, outcome, message)
        ran = [test_id for test_id in pending if test_id in results]
        fault = next((t for t in ran if results[t]["outcome"] in ("failed", "error")
                      and CUDA_FAULT.search(results[t]["message"])), None)
        if fault is not None:  # behind it, the context was poisoned: those run again
            ran = ran[:ran.index(fault) + 1]
        for test_id in ran:
            outcomes[test_id] = {**results[test_id], "run": runs}
            if test_id in run_cases:
                cases[test_id] = run_cases[test_id]
        pending = [test_id for test_id in pending if test_id not in outcomes]
    if cases:
        suite = ElementTree.Element("testsuite", name="gpu", tests=str(len(cases)))
        suite.extend(cases.values())
        ElementTree.ElementTree(suite).write(junit_path, encoding="utf-8", xml_declaration=True)
    counts = {outcome: sum(o["outcome"] == outcome for o in outcomes.values())
              for outcome in ("passed", "failed", "error", "skipped", "timed out")}
    result = {"tests": len(outcomes) + len(pending), **counts, "not_run": pending, "pytest_runs": runs,
              "problems": {t: o for t, o in outcomes.items() if o["outcome"] in ("failed", "error", "timed out")}}
    if not outcomes and not pending:
        result["collect_output"] = collect_output
    return result


# ------------------------------------------------------------------------------------ stages
def stage_sites(dry_run: bool) -> dict:
    import torch

    from sparsedist.bench.sparsity import run_site_benchmark

    if dry_run:
        return run_site_benchmark(device="cpu", dtype=torch.float32, channels_last=True, repeats=1, **DRY_RUN_BENCHMARK)
    return run_site_benchmark(device="cuda", dtype=torch.bfloat16, channels_last=True, **BENCHMARK)


def stage_steps(dry_run: bool, precision: str, compile: bool = False, compile_mode: str = "default",
                cudnn_benchmark: bool = False) -> dict:
    from sparsedist.bench.sparsity import run_sparsity_benchmark

    # A dry run keeps compile off: CPU inductor compilations take minutes; the stage's plumbing is what runs.
    run = ({"repeats": 1, "warmup": 1, **DRY_RUN_BENCHMARK} if dry_run else
           {"device": "cuda", "compile": compile, "compile_mode": compile_mode, "repeats": 20, "warmup": 3, **BENCHMARK})
    return run_sparsity_benchmark(precision=precision, channels_last=True, cudnn_benchmark=cudnn_benchmark, **run)


# The step benchmarks' settings. cuDNN runs as training runs it (deterministic) but in the stage that
# says it runs the autotuner; reduce-overhead is `train.compile_mode`'s CUDA graphs.
STEP_STAGES = {
    "steps": {"precision": "bf16"},
    "steps_fp16": {"precision": "fp16"},
    "steps_cudnn_benchmark": {"precision": "bf16", "cudnn_benchmark": True},
    "steps_compiled": {"precision": "bf16", "compile": True},
    "steps_cuda_graphs": {"precision": "bf16", "compile": True, "compile_mode": "reduce-overhead"},
}
# Stages run by `--stage NAME` in their own process; "tests" runs pytest processes from the parent's side.
BENCHMARK_STAGES = {"sites": stage_sites,
                    **{name: partial(stage_steps, **settings) for name, settings in STEP_STAGES.items()}}
STAGES = ("tests", *BENCHMARK_STAGES)


def gpu_plan(name: str) -> str:
    """What a stage runs on the GPU, in words (a dry run prints it beside what it ran instead)."""
    model = f"WRN-{BENCHMARK['depth']}-{BENCHMARK['widen_factor']}, batch {BENCHMARK['batch_size']}, keep ratio " \
            f"{BENCHMARK['keep_ratio']}"
    if name == "tests":
        return f"pytest -m gpu {TEST_FILE}, each test at most {TEST_LIMIT_S} s"
    if name == "sites":
        return f"every site shape of {model}, bf16, channels_last"
    settings = STEP_STAGES[name]
    compile_mode = settings["compile_mode"] if "compile_mode" in settings else (
        "default" if settings.get("compile") else "off")
    return (f"train steps of {model}, {settings['precision']} autocast, channels_last, cuDNN "
            f"{'benchmark' if settings.get('cudnn_benchmark') else 'deterministic'}, compile {compile_mode}")


# ------------------------------------------------------------------------------------ targets
SITE_SPEEDUP_TARGET = 5.0  # the kernels over torch.topk + mask, all sites of a batch together
DENSE_COMPILED_IMAGES_PER_S = 40_000


def target_verdicts(report: dict) -> list[dict]:
    """Issue 20's targets, each with its figure and whether it was met: None where no stage measured it,
    and in a dry run (CPU at tiny shapes measures the plumbing, not the GPU)."""
    from sparsedist.bench.sparsity import TARGET_RATIO

    def result(name: str) -> dict:
        stage = report["stages"].get(name, {})
        return stage.get("result", {}) if stage.get("status") == "ok" else {}

    verdicts = []

    def judge(target: str, figure: float | None, met: bool) -> None:
        judged = figure is not None and not report["environment"]["dry_run"]
        verdicts.append({"target": target, "figure": figure, "met": met if judged else None})

    sites = result("sites").get("total", {})
    for scope, reference in (("layer", "topk_scatter"), ("network", "topk_where")):
        row = sites.get(scope, {})
        speedup = row[f"{reference}_ms"] / row["kernel_ms"] if row else None
        judge(f"{scope} kernels >= {SITE_SPEEDUP_TARGET:g}x {reference} (sites)", speedup,
              speedup is not None and speedup >= SITE_SPEEDUP_TARGET)
    for name in ("steps", "steps_fp16"):
        ratios = result(name).get("ratio_to_dense", {})
        for scope, limit in TARGET_RATIO["cuda"].items():
            judge(f"{scope} step <= {limit}x dense ({name})", ratios.get(scope),
                  scope in ratios and ratios[scope] <= limit)
    images_per_s = result("steps_compiled").get("images_per_s", {}).get("dense_compiled")
    judge(f"dense compiled >= {DENSE_COMPILED_IMAGES_PER_S} images/s (steps_compiled)", images_per_s,
          images_per_s is not None and images_per_s >= DENSE_COMPILED_IMAGES_PER_S)
    return verdicts


# ------------------------------------------------------------------------------ orchestration
def _run_stage(name: str, scratch: str, env: dict, limit_s: float, dry_run: bool) -> dict:
    """One benchmark stage in its own process group (a time-out ends its children too); its output is
    streamed to a log in `scratch`, whose tail is kept when the stage fails."""
    part, log_path = os.path.join(scratch, f"{name}.json"), os.path.join(scratch, f"{name}.log")
    start = time.monotonic()
    command = [sys.executable, "-m", "sparsedist.gpu_check", "--stage", name, "--out", scratch,
               *(["--dry-run"] if dry_run else [])]
    with open(log_path, "w", encoding="utf-8") as log:
        stage = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            stage.wait(timeout=max(limit_s, 1))
            status = "ok" if stage.returncode == 0 and os.path.exists(part) else f"failed (exit {stage.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
            status = f"timed out after {limit_s:.0f} s"
    result = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    if os.path.exists(part):
        with open(part, encoding="utf-8") as handle:
            result["result"] = json.load(handle)
    if status != "ok":
        with open(log_path, encoding="utf-8", errors="replace") as log:
            result["log_tail"] = log.read()[-4000:]
    return result


def stage_limit(name: str, left_s: float) -> float:
    """A stage's time limit when `left_s` seconds of the budget remain: its own, or an equal share of
    what is left with the later stages that have none."""
    if name in STAGE_LIMIT_S:
        return min(STAGE_LIMIT_S[name], left_s)
    return left_s / sum(later not in STAGE_LIMIT_S for later in STAGES[STAGES.index(name):])


def _tests_stage(out_dir: str, scratch: str, env: dict, limit_s: float) -> dict:
    start = time.monotonic()
    result = run_gpu_tests(out_dir, scratch, env, deadline=start + limit_s)
    ok = result["tests"] > 0 and not result["problems"] and not result["not_run"]
    status = "ok" if ok else ("no tests collected" if result["tests"] == 0 else "tests failed or did not run")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "result": result}


def _summary(report: dict) -> str:
    environment = report["environment"]
    lines = [f"gpu-check: {environment['device']} (sm_{''.join(map(str, environment['capability']))}), torch "
             f"{environment['torch']}, CUDA {environment['cuda']}, triton {environment['triton']}"]
    for name, stage in report["stages"].items():
        lines.append(f"{name}: {stage['status']} in {stage['seconds']} s")
        result = stage.get("result", {})
        if name == "tests" and result:
            lines.append(f"  {result['passed']} passed, {result['failed'] + result['error']} failed, "
                         f"{result['timed out']} timed out, {result['skipped']} skipped, {len(result['not_run'])} "
                         f"not run ({result['pytest_runs']} pytest run(s))")
            lines += [f"  {outcome['outcome']}: {test_id}" for test_id, outcome in result["problems"].items()]
        elif name == "sites" and result:
            for scope, row in result["total"].items():
                lines.append(f"  {scope}: kernels {row['kernel_ms']:.2f} ms for all sites; in the kernels' time, "
                             + ", ".join(f"{other} {row[f'{other}_ms'] / row['kernel_ms']:.2f}x"
                                         for other in row["compared"]))
        elif result:
            setup = result["setup"]
            lines.append(f"  {setup['dtype']}, cuDNN {setup['cudnn']}, compile {setup['compile_mode'] or 'off'}")
            ratios, images_per_s = result["ratio_to_dense"], result["images_per_s"]
            lines.append("  x eager dense: " + ", ".join(f"{variant} {ratio:.3f}" for variant, ratio in ratios.items()))
            if "dense_compiled" in ratios:
                lines.append("  x compiled dense: " + ", ".join(
                    f"{scope} {ratios[f'{scope}_compiled'] / ratios['dense_compiled']:.3f}" for scope in ("layer", "network")))
            lines.append(f"  dense {images_per_s['dense']:.0f} images/s"
                         + (f", compiled {images_per_s['dense_compiled']:.0f}" if "dense_compiled" in images_per_s else ""))
        if environment["dry_run"]:
            lines.append(f"  on the GPU: {gpu_plan(name)}")
    lines.append("targets" + (" (not judged in a dry run: CPU at tiny shapes measures the plumbing)"
                              if environment["dry_run"] else "") + ":")
    for verdict in report["targets"]:
        figure = "not measured" if verdict["figure"] is None else f"{verdict['figure']:.3g}"
        met = {True: "met", False: "MISSED", None: "-"}[verdict["met"]]
        lines.append(f"  {met:<6} {verdict['target']}: {figure}")
    return "\n".join(lines) + "\n"


def run_check(out_dir: str, wheel_dir: str, budget_s: float, dry_run: bool = False) -> int:
    problem = None if dry_run else cuda_problem()
    if problem:
        print(f"gpu-check needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    problem = wheels_problem(wheel_dir)
    if problem:
        print(f"gpu-check cannot start: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    deadline = time.monotonic() + budget_s
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        site_dir = os.path.join(scratch, "site-packages")
        installed = install_missing(wheel_dir, site_dir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site_dir, REPO, os.environ.get("PYTHONPATH")])),
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS for the bitwise tests
               "PYTHONUNBUFFERED": "1"}  # stage output reaches its log as it is printed
        if dry_run:
            env["TRITON_INTERPRET"] = "1"
        report = {"environment": {**_environment(dry_run), "installed_wheels": installed}, "stages": {}}
        for name in STAGES:
            limit = stage_limit(name, deadline - time.monotonic())
            report["stages"][name] = (_tests_stage(out_dir, scratch, env, limit) if name == "tests"
                                      else _run_stage(name, scratch, env, limit, dry_run))
            report["targets"] = target_verdicts(report)
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
                        help="folder for the result files (default: $OUT, else ./gpu-check)")
    parser.add_argument("--wheels", default=os.path.join(REPO, "wheels"), help="wheels of the missing packages")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole check on CPU: Triton's interpreter, tiny shapes (tests the script itself)")
    parser.add_argument("--stage", choices=sorted(BENCHMARK_STAGES), help=argparse.SUPPRESS)  # in a subprocess
    args = parser.parse_args(argv)
    if args.stage is None:
        return run_check(os.path.abspath(args.out), args.wheels, args.budget, args.dry_run)
    result = BENCHMARK_STAGES[args.stage](args.dry_run)
    with open(os.path.join(args.out, f"{args.stage}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
