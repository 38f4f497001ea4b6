"""cluster/: launcher configs valid under the schema Ray ships, a KubeRay RayJob whose entrypoint is a
valid run of ours on its shared volume, a runtime env that leaves the heavy directories behind, and one
node setup recipe pinned like the test suite."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
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
def test_launcher_config_keeps_the_cluster_private_and_sets_up_ffcv_from_the_shared_recipe(name):
    config = load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), never publicly
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["setup_commands"] == ["bash ~/sparsedist/cluster/setup-node.sh"]
    assert config["docker"]["image"] == f"rayproject/ray:{installed_ray_version()}-py311-gpu"
    assert any("/mnt/shared:/mnt/shared" in option for option in config["docker"]["run_options"])
    assert {".venv", "data", "runs"} <= set(config["rsync_exclude"])
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == workers["max_workers"] == config["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_node_recipe_installs_ffcv_libraries_and_pins_torch_like_the_test_suite():
    recipe = (CLUSTER / "setup-node.sh").read_text()
    assert "libopencv-dev libturbojpeg0-dev pkg-config" in recipe
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in recipe
    assert pins["ray"] == installed_ray_version()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pins['ray']}-py311-gpu" in dockerfile
    assert "cluster/setup-node.sh" in dockerfile
    assert {".venv/", "data/", "runs/"} <= set((CLUSTER / "Dockerfile.dockerignore").read_text().split())


def test_runtime_env_ships_the_working_tree_without_virtualenv_data_and_runs():
    runtime_env = load("runtime-env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {".venv/", "data/", "runs/", "sweeps/", "models/", "mlruns/", "mlflow.db"} <= set(runtime_env["excludes"])


KUBERAY_FILES = ("kuberay-storage.yaml", "kuberay-rayjob.yaml")


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for name in KUBERAY_FILES for doc in yaml.safe_load_all((CLUSTER / name).read_text())}


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
