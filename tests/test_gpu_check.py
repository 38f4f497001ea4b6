"""The CPU-side parts of `make gpu-check`: the refusal without CUDA, the wheel install step, the summary."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zipfile

import pytest
import torch

from sparsedist import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_without_cuda_the_check_says_so_and_exits_before_doing_anything(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "sparsedist.gpu_check", "--out", str(out), "--wheels", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "Nothing was run" in done.stderr
    assert not out.exists()


def write_wheel(folder, module: str) -> None:
    """A minimal pure-Python wheel holding `module` (what `pip download` brings, in miniature)."""
    dist_info = f"{module}-0.1.dist-info"
    files = {f"{module}/__init__.py": "ANSWER = 42\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(folder / f"{module}-0.1-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_missing_modules_are_installed_from_the_local_wheels_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    write_wheel(tmp_path, "sparsedist_wheel_probe")
    target = tmp_path / "site"
    assert gpu_check.install_missing(str(tmp_path), str(target), needed=("json",)) == []  # present: nothing to do
    assert not target.exists()
    installed = gpu_check.install_missing(str(tmp_path), str(target), needed=("sparsedist_wheel_probe",))
    assert installed == ["sparsedist_wheel_probe-0.1-py3-none-any.whl"]
    assert importlib.import_module("sparsedist_wheel_probe").ANSWER == 42
    monkeypatch.delitem(sys.modules, "sparsedist_wheel_probe")


def test_a_missing_module_without_wheels_stops_the_check_with_the_remedy(tmp_path):
    with pytest.raises(SystemExit, match="make gpu-wheels"):
        gpu_check.install_missing(str(tmp_path), str(tmp_path / "site"), needed=("sparsedist_not_a_module",))


def test_without_wheels_for_a_missing_module_the_check_refuses_up_front_naming_the_command(tmp_path):
    assert gpu_check.wheels_problem(str(tmp_path), needed=("json",)) is None  # nothing missing
    problem = gpu_check.wheels_problem(str(tmp_path), needed=("sparsedist_not_a_module",))
    assert "sparsedist_not_a_module" in problem and "make gpu-wheels" in problem and 'carry ["wheels"]' in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for a machine without CUDA")
def test_the_dry_run_runs_every_stage_and_leaves_only_its_result_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "sparsedist.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.RESULT_FILES)  # nothing else, no folders
    report = json.loads((out / "gpu-check.json").read_text())
    assert list(report["stages"]) == list(gpu_check.STAGES) and report["environment"]["dry_run"]
    assert all(stage["status"] == "ok" for stage in report["stages"].values()), report["stages"]
    tests = report["stages"]["tests"]["result"]
    assert tests["tests"] >= 10 and tests["skipped"] == tests["tests"] and tests["pytest_runs"] == 1
    summary = (out / "gpu-check.txt").read_text()
    assert summary == done.stdout and "layer: kernels" in summary and "network: kernels" in summary
    assert "dense 1.000," in summary and f"{tests['tests']} skipped" in summary
    # Each step stage ran its GPU precision at tiny shapes; the summary names what the GPU runs instead.
    assert [report["stages"][name]["result"]["setup"]["dtype"] for name in gpu_check.STEP_STAGES] == [
        f"{settings['precision']} autocast" for settings in gpu_check.STEP_STAGES.values()]
    assert "on the GPU: train steps of WRN-28-4, batch 128" in summary and "compile reduce-overhead" in summary
    assert [verdict["met"] for verdict in report["targets"]] == [None] * 7 and "not judged in a dry run" in summary
    assert "tests/test_gpu.py::test_resume_on_cuda_continues_the_identical_trajectory[fp16] SKIPPED" in (
        out / "gpu-tests.log").read_text()


def test_the_compiled_stages_share_what_the_others_left():
    assert gpu_check.stage_limit("tests", gpu_check.BUDGET_S) == gpu_check.STAGE_LIMIT_S["tests"]
    assert gpu_check.stage_limit("sites", 10) == 10  # never past the budget
    assert gpu_check.stage_limit("steps_compiled", 260) == 130  # half: steps_cuda_graphs comes after it
    assert gpu_check.stage_limit("steps_cuda_graphs", 140) == 140
    assert sum(gpu_check.STAGE_LIMIT_S.values()) <= gpu_check.BUDGET_S - 120  # 60 s each at the least


def test_targets_are_judged_from_the_stages_that_measured_them():
    def steps(layer: float, network: float, **images_per_s: float) -> dict:
        return {"status": "ok", "result": {"ratio_to_dense": {"dense": 1.0, "layer": layer, "network": network},
                                           "images_per_s": images_per_s}}

    report = {"environment": {"dry_run": False}, "stages": {
        "sites": {"status": "ok", "result": {"total": {"layer": {"kernel_ms": 1.0, "topk_scatter_ms": 6.0},
                                                       "network": {"kernel_ms": 1.0, "topk_where_ms": 4.0}}}},
        "steps": steps(1.04, 1.06),
        "steps_fp16": {"status": "timed out after 45 s"},
        "steps_compiled": steps(1.0, 1.0, dense_compiled=41_000.0)}}
    verdicts = {verdict["target"]: (verdict["figure"], verdict["met"]) for verdict in gpu_check.target_verdicts(report)}
    assert verdicts == {
        "layer kernels >= 5x topk_scatter (sites)": (6.0, True),
        "network kernels >= 5x topk_where (sites)": (4.0, False),
        "layer step <= 1.05x dense (steps)": (1.04, True),
        "network step <= 1.05x dense (steps)": (1.06, False),
        "layer step <= 1.05x dense (steps_fp16)": (None, None),  # the stage timed out: nothing to judge
        "network step <= 1.05x dense (steps_fp16)": (None, None),
        "dense compiled >= 40000 images/s (steps_compiled)": (41_000.0, True),
    }


# GPU-test stand-ins: a hang, and a CUDA fault that poisons the rest of its process.
FAULTY_TESTS = """
import time
import pytest

pytestmark = pytest.mark.gpu
POISONED = []


def test_first():
    pass


def test_hangs():
    time.sleep(600)


def test_faults():
    POISONED.append(True)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_after_the_fault():
    assert not POISONED, "the context of this process is poisoned"
"""


def test_a_hung_test_and_a_cuda_fault_cost_only_themselves(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_faulty.py").write_text(FAULTY_TESTS)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir(), scratch.mkdir()
    result = gpu_check.run_gpu_tests(str(out), str(scratch), dict(os.environ), deadline=time.monotonic() + 240,
                                     test_file="tests/test_faulty.py", cwd=str(tmp_path), test_limit_s=6)
    problems = {test_id.split("::")[1]: outcome for test_id, outcome in result["problems"].items()}
    assert set(problems) == {"test_hangs", "test_faults"} and problems["test_hangs"]["outcome"] == "timed out"
    assert "illegal memory access" in problems["test_faults"]["message"]
    # Run 1 hangs and is killed; run 2 faults; run 3 runs the test behind the fault again, in a fresh process.
    assert result["pytest_runs"] == 3 and result["passed"] == 2 and result["not_run"] == []
    log = (out / "gpu-tests.log").read_text()
    assert "test_hangs" in log.split("===== pytest run 2")[0] and "Timeout" in log  # faulthandler's stack dump
    junit = ElementTree.parse(out / "gpu-tests.xml").getroot()
    assert sorted(case.get("name") for case in junit.iter("testcase")) == ["test_after_the_fault", "test_faults"]
