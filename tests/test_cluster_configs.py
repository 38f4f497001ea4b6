"""cluster/: launcher configs valid under the schema Ray ships, a KubeRay RayJob whose entrypoint is a
valid run of ours on its shared volume, a runtime env that leaves the heavy directories behind, and one
node image (cluster/Dockerfile) for both, pinned like the test suite, whose node check runs here."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from sparsedist.launch.train import add_train_arguments, config_from_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
ENTRYPOINT = ["python", "-m", "sparsedist", "train"]
RAY_PACKAGE = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
IMAGE_PROJECT = "/home/ray/sparsedist"  # where cluster/Dockerfile puts the project


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def installed_ray_version() -> str:
    return re.search(r'^version = "([^"]+)"', (RAY_PACKAGE / "_version.py").read_text(), re.M).group(1)


def parse_entrypoint(entrypoint: str):
    """The run a `python -m sparsedist train ...` entrypoint would start, validated like ours."""
    words = shlex.split(entrypoint)
    assert words[:len(ENTRYPOINT)] == ENTRYPOINT, words
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(words[len(ENTRYPOINT):]))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid_under_rays_cluster_schema(name):
    schema = json.loads((RAY_PACKAGE / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_keeps_the_cluster_private_and_runs_the_project_image(name):
    config = load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), never publicly
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    # Nodes start from the image KubeRay runs; nothing is synced over the project it holds.
    assert config["docker"]["image"] == kuberay_image()
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "setup_commands" not in config
    assert config["head_setup_commands"] == [f"python {IMAGE_PROJECT}/cluster/check-node.py"]
    assert config["worker_setup_commands"] == [f"python {IMAGE_PROJECT}/cluster/check-node.py --gpu"]
    assert any("/mnt/shared:/mnt/shared" in option for option in config["docker"]["run_options"])
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == workers["max_workers"] == config["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


# The oldest driver branch each CUDA major of the pinned torch runs on (NVIDIA's CUDA compatibility table).
MINIMUM_DRIVER = {12: 525, 13: 580}


def test_launcher_host_images_carry_a_driver_that_runs_the_pinned_torch():
    import torch

    needed = MINIMUM_DRIVER[int(torch.version.cuda.split(".")[0])]
    families = values_of(load("gcp-gpu.yaml"), "sourceImage")
    assert len(families) == 2
    for family in families:  # Deep Learning VM families name their driver: ...-nvidia-580
        assert int(re.search(r"-nvidia-(\d+)$", family).group(1)) >= needed, family
    # AWS: not Ray's latest_dlami (a CUDA 11 AMI in Ray 2.60) but the newest Base OSS Nvidia Driver AMI,
    # through its public SSM parameter (driver 580 and newer since its late-2025 releases).
    amis = values_of(load("aws-gpu.yaml"), "ImageId")
    assert len(amis) == 2 and set(amis) == {
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"}


def test_node_image_builds_ffcv_apart_and_copies_the_source_last():
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["ray"] == installed_ray_version()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{pins['ray']}-py311-gpu" in dockerfile
    build, final = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert build.startswith("${RAY_IMAGE} AS ffcv-build") and final.startswith("${RAY_IMAGE}\n")
    assert "libopencv-dev libturbojpeg0-dev pkg-config" in build and f"ffcv=={pins['ffcv']}" in build
    for stage in (build, final):  # pip keeps no cache in any layer
        assert "ARG PIP_NO_CACHE_DIR=1" in stage
    # The final stage installs the shared libraries the build found, never headers or compilers.
    assert not re.search(r"-dev\b|\bg\+\+|build-essential", final)
    assert f"pip install --quiet torch=={pins['torch']} torchvision=={pins['torchvision']}" in final
    source_copy = final.index("COPY --chown=ray:users . /home/ray/sparsedist")
    assert final.rindex('".[train,tune,mlflow]"') < source_copy and final.rindex("torch==") < source_copy
    assert "cluster/check-node.py" in final[source_copy:]
    # What a job's working dir leaves behind stays out of the image too.
    assert set(load("runtime-env.yaml")["excludes"]) <= set((CLUSTER / "Dockerfile.dockerignore").read_text().split())


def test_the_images_dependency_layer_requires_what_the_project_requires(tmp_path):
    """The image installs the dependencies from a package holding only pyproject.toml (so that a source edit
    does not reinstall them): built the same way here, its metadata must require what the project's does."""
    stub = tmp_path / "deps"
    (stub / "sparsedist").mkdir(parents=True)
    (stub / "sparsedist" / "__init__.py").touch()
    (stub / "README.md").touch()
    (stub / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(stub)], check=True)
    [wheel] = (tmp_path / "wheel").glob("sparsedist-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    required = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert required and sorted(required) == sorted(importlib.metadata.requires("sparsedist"))


def test_node_check_loads_ffcv_and_names_a_missing_gpu():
    import torch

    check = [sys.executable, str(CLUSTER / "check-node.py")]
    done = subprocess.run(check, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "ffcv and sparsedist import" in done.stdout, done.stderr
    if not torch.cuda.is_available():  # with a GPU, tests/test_gpu.py runs the NCCL part
        done = subprocess.run([*check, "--gpu"], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 1 and "sees no GPU" in done.stderr and "Traceback" not in done.stderr
    # The process group of --gpu on gloo, set up and torn down as NCCL's is on a GPU node.
    script = "import runpy, sys, torch; runpy.run_path(sys.argv[1])['all_reduce_once']('gloo', torch.device('cpu'))"
    done = subprocess.run([sys.executable, "-c", script, str(CLUSTER / "check-node.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_runtime_env_ships_the_working_tree_without_virtualenv_data_and_runs():
    runtime_env = load("runtime-env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {".venv/", "data/", "runs/", "sweeps/", "models/", "mlruns/", "mlflow.db"} <= set(runtime_env["excludes"])


KUBERAY_FILES = ("kuberay-storage.yaml", "kuberay-rayjob.yaml")


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for name in KUBERAY_FILES for doc in yaml.safe_load_all((CLUSTER / name).read_text())}


def kuberay_image() -> str:
    """The image every KubeRay pod runs (the one built from cluster/Dockerfile)."""
    [image] = set(values_of(kuberay_documents()["RayJob"], "image"))
    return image


def test_kuberay_job_file_holds_no_volume_so_deleting_the_job_keeps_the_results():
    kinds = [doc["kind"] for doc in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())]
    assert kinds == ["RayJob"]


def pod_mounts(template: dict) -> dict[str, str]:
    """mountPath -> PersistentVolumeClaim name, for the pod template's containers."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]] for c in template["spec"]["containers"]
            for m in c["volumeMounts"] if m["name"] in claims}


def test_kuberay_rayjob_runs_a_valid_gpu_run_on_its_shared_volume():
    documents = kuberay_documents()
    claim, job = documents["PersistentVolumeClaim"], documents["RayJob"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["apiVersion"] == "ray.io/v1"
    cfg = parse_entrypoint(job["spec"]["entrypoint"])
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == installed_ray_version()
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # the run directory and the data are on the same claim in every pod
        mounts = pod_mounts(group["template"])
        assert mounts == {"/mnt/shared": claim["metadata"]["name"]}
        assert cfg.run.run_dir.startswith("/mnt/shared/") and cfg.data.root.startswith("/mnt/shared/")
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        assert cfg.scaling.cpus_per_worker <= float(limits["cpu"])
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == gpus
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # the image built from cluster/Dockerfile everywhere


def values_of(node, key: str) -> list:
    """Every value stored under `key` anywhere in a YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in values_of(v, key)]
    if isinstance(node, list):
        return [x for item in node for x in values_of(item, key)]
    return []


def test_kuberay_rayjob_uses_token_auth_and_no_public_service():
    documents = kuberay_documents()
    auth = documents["RayJob"]["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token"
    # The Secret the docs tell you to create once is the one the job reads its token from.
    created = re.findall(r"kubectl create secret generic (\S+) --from-literal=auth_token=", (REPO / "docs" / "ray.md").read_text())
    assert created == [auth["secretName"]]
    service_types = values_of(list(documents.values()), "serviceType") + values_of(list(documents.values()), "type")
    assert not {"LoadBalancer", "NodePort"} & set(map(str, service_types))
    assert "Service" not in documents and "Ingress" not in documents
