"""The CPU-side parts of `make gpu-check`: the refusal without CUDA, the wheel install step, the summary."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from sparsedist import gpu_check
from sparsedist.bench.sparsity import run_site_benchmark, run_sparsity_benchmark


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


def test_the_summary_reads_every_stage_result():
    # Real results of the stage functions, run small on CPU (the kernels in Triton's interpreter).
    sites = run_site_benchmark(batch_size=2, depth=10, widen_factor=1, image_size=8, device="cpu",
                               dtype=torch.float32, channels_last=True, repeats=1)
    steps = run_sparsity_benchmark(batch_size=2, repeats=1, warmup=1, depth=10, widen_factor=1, image_size=8)
    tests = {"tests": 3, "failures": 1, "errors": 0, "skipped": 0, "passed": 2, "failed": ["tests.test_gpu::x"]}
    report = {"environment": {"device": "cpu", "capability": [0, 0], "torch": torch.__version__, "cuda": None,
                              "triton": None},
              "stages": {"tests": {"status": "ok", "seconds": 1.0, "result": tests},
                         "sites": {"status": "ok", "seconds": 1.0, "result": sites},
                         "steps": {"status": "ok", "seconds": 1.0, "result": steps},
                         "steps_compiled": {"status": "timed out after 5 s", "seconds": 5.0}}}
    summary = gpu_check._summary(report)
    assert "2 passed, 1 failed" in summary and "tests.test_gpu::x" in summary
    assert "layer: kernels" in summary and "topk_scatter" in summary and "network: kernels" in summary
    assert "dense 1.000x" in summary and "steps_compiled: timed out after 5 s" in summary


def test_a_stage_runs_in_its_own_process_and_reports_the_gpu_tests(tmp_path):
    # Without CUDA every GPU test skips with its reason; the stage still runs, parses and reports them.
    env = {**os.environ, "PYTHONPATH": gpu_check.REPO}
    stage = gpu_check._run_stage("tests", str(tmp_path), env, limit_s=300)
    assert stage["status"] == "ok", stage
    result = stage["result"]
    expected_skips = 0 if torch.cuda.is_available() else result["tests"]
    assert result["tests"] >= 8 and result["skipped"] == expected_skips and result["failed"] == []
