"""The core package alone: a fresh virtual environment where pip installs the project with no extras.

pip builds the project from a copy of its source and resolves the core's dependencies itself. torch is
the project environment's own installed wheel: its files, and those of the distributions it requires,
are linked into the new environment (a .pth entry), not installed again: the CUDA build is 5.5 GB and
pip, finding it installed, leaves it. The core must validate configs, load an exported model and run
`model.pt2` with outputs identical to the project environment's, and name the extra other commands need.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import venv

import pytest
import torch
from packaging.requirements import Requirement

from sparsedist.cli import main
from tests.export_helpers import train_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_MODULES = ("ray", "ffcv", "numba", "torchvision", "tensorboard", "pyarrow", "optuna", "scipy", "matplotlib",
                 "mlflow", "cv2")
pytestmark = pytest.mark.slow


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(name):
    """The installed distributions `name` needs (with the extras its requirements ask for), itself included."""
    found, done, pending = {}, set(), [(name, "")]
    while pending:
        current, extra = pending.pop()
        distribution = importlib.metadata.distribution(current)
        key = _normalized(distribution.metadata["Name"])
        if (key, extra) in done:
            continue
        done.add((key, extra))
        found[key] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                pending += [(requirement.name, e) for e in requirement.extras | {""}]
    return found


def link_installed(distribution_name, target, with_requirements=True):
    """Symlink the top-level files and folders of `distribution_name` (and its requirements) into `target`."""
    os.makedirs(target)
    distributions = (requirement_closure(distribution_name) if with_requirements
                     else {distribution_name: importlib.metadata.distribution(distribution_name)})
    for key, distribution in distributions.items():
        if key in ("pip", "setuptools"):  # the new environment has its own
            continue
        for top in {f.parts[0] for f in distribution.files or [] if f.parts[0] != ".." and f.suffix != ".pth"}:
            source, link = distribution.locate_file(top), os.path.join(target, top)
            if os.path.exists(source) and not os.path.lexists(link):
                os.symlink(source, link)


@pytest.fixture(scope="module")
def core_env(tmp_path_factory):
    """The environment's bin directory, with `pip install <copy of the project>` done."""
    root = tmp_path_factory.mktemp("core")
    source = root / "src"
    shutil.copytree(os.path.join(REPO, "sparsedist"), source / "sparsedist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    env = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    link_installed("torch", str(root / "torch-installed"))
    site = next(env.glob("lib/python*/site-packages"))
    (site / "torch-installed.pth").write_text(str(root / "torch-installed") + "\n")
    install = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return env / "bin"


def run_in(core_env, *args, pythonpath=None):
    # Without PYTHONPATH or PYTHONHOME: nothing but the environment's own packages (and `pythonpath`) may be imported.
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([str(core_env / args[0]), *args[1:]], capture_output=True, text=True, timeout=300,
                          cwd=core_env.parent.parent, env=env)


def test_core_has_none_of_the_extras(core_env):
    probe = run_in(core_env, "python", "-c", "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
                   "if importlib.util.find_spec(m)))", *EXTRA_MODULES)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == []
    torch_there = run_in(core_env, "python", "-c", "import torch; print(torch.__version__)")
    assert torch_there.stdout.strip() == torch.__version__


def test_core_validates_configs(core_env, capsys):
    result = run_in(core_env, "sparsedist", "config", "validate", "--config", "paper-s2", "--set", "train.epochs=50")
    assert result.returncode == 0, result.stderr
    assert main(["config", "validate", "--config", "paper-s2", "--set", "train.epochs=50"]) == 0
    assert result.stdout == capsys.readouterr().out
    invalid = run_in(core_env, "sparsedist", "config", "validate", "--set", "train.epochs=-1", "--set", "optim.lr=fast")
    assert invalid.returncode == 2
    assert "train.epochs" in invalid.stderr and "optim.lr" in invalid.stderr
    for command in (["sparsedist", "--version"], ["python", "-m", "sparsedist", "--version"]):
        version = run_in(core_env, *command)
        assert version.stdout.strip() == f"sparsedist {importlib.metadata.version('sparsedist')}", version.stderr


def test_core_loads_an_export_and_runs_its_program_as_the_project_environment_does(core_env, tmp_path):
    run_dir = train_run(str(tmp_path), "network")
    export_dir = str(tmp_path / "model")
    assert main(["export", run_dir, "--out", export_dir, "--program"]) == 0
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch, sparsedist\n"
        "export_dir, images_path, out = sys.argv[1:]\n"
        "images = torch.load(images_path)\n"
        "model = sparsedist.load_model(export_dir, keep_ratio=0.05)\n"
        "program = torch.export.load(export_dir + '/model.pt2').module()\n"
        "with torch.no_grad():\n"
        "    outputs = {'eager': model(images), 'program': program(images.float(), torch.tensor(0.05, dtype=torch.float64))}\n"
        "torch.save(outputs, out)\n"
    )
    result = run_in(core_env, "python", "-c", script, export_dir, str(tmp_path / "images.pt"), str(tmp_path / "core.pt"))
    assert result.returncode == 0, result.stderr
    core = torch.load(tmp_path / "core.pt")

    from sparsedist import load_model

    model = load_model(export_dir, keep_ratio=0.05)
    program = torch.export.load(os.path.join(export_dir, "model.pt2")).module()
    with torch.no_grad():
        assert torch.equal(core["eager"], model(images))
        assert torch.equal(core["program"], program(images.float(), torch.tensor(0.05, dtype=torch.float64)))


@pytest.mark.parametrize("command, extra", [
    (["train", "--config", "smoke"], "train"),
    (["eval", "runs/x"], "train"),
    (["data", "prepare", "--dataset", "synthetic"], "train"),
    (["tune", "--config", "smoke", "--space", "x.yaml"], "tune"),
    (["report", "runs/x"], "report"),
])
def test_a_command_without_its_extra_exits_2_naming_it(core_env, command, extra):
    result = run_in(core_env, "sparsedist", *command)
    assert result.returncode == 2, result.stderr
    assert f"needs the [{extra}] extra" in result.stderr
    source = json.loads(run_in(core_env, "python", "-c", "import importlib.metadata as m; "
                               "print(m.distribution('sparsedist').read_text('direct_url.json'))").stdout)["url"]
    assert f"pip install '{source.removeprefix('file://')}[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_extra_with_unmet_extras_or_versions_of_its_own_is_named(core_env, tmp_path):
    # Ray alone, as `pip install ray` leaves it: present, but not what ray[tune] or ray[default] ask for.
    bare_ray = str(tmp_path / "bare-ray")
    link_installed("ray", bare_ray, with_requirements=False)
    result = run_in(core_env, "sparsedist", "tune", "--config", "smoke", "--space", "x.yaml", pythonpath=bare_ray)
    assert result.returncode == 2 and "needs the [tune] extra" in result.stderr, result.stderr
    assert "pandas (for ray[tune])" in result.stderr and re.search(r"aiohttp\S* \(for ray\[default\]\)", result.stderr)
    assert "Traceback" not in result.stderr
    # An installed Ray of another release than the extras pin (its metadata, as pip writes it).
    old_ray = tmp_path / "old-ray" / "ray-2.59.0.dist-info"
    old_ray.mkdir(parents=True)
    (old_ray / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.59.0\n")
    result = run_in(core_env, "sparsedist", "train", "--config", "smoke", pythonpath=str(old_ray.parent))
    assert result.returncode == 2 and "needs the [train] extra" in result.stderr, result.stderr
    assert re.search(r"ray\[default,train\]\S*>=2\.60\S* \(2\.59\.0 is installed\)", result.stderr), result.stderr
