#!/usr/bin/env bash
# Prepares one Ray node (a rayproject/ray:2.60.0-py311-gpu container) to run sparsedist: FFCV's system
# libraries, then torch pinned before everything else (ray[train] would otherwise pull another build),
# then the project with the versions the test suite runs against. Used by cluster/Dockerfile (KubeRay)
# and by the launcher configs' setup_commands; safe to run again.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sudo apt-get update -qq
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopencv-dev libturbojpeg0-dev pkg-config >/dev/null
pip install --quiet torch==2.14.1 torchvision==0.29.1
pip install --quiet -c "$repo/constraints.txt" numpy numba cython pkgconfig
pip install --quiet -c "$repo/constraints.txt" -e "$repo[train,tune,mlflow]"  # what runs on nodes: trials, sweeps, tracking
python -c "import ffcv, sparsedist.launch.train" # fail the node setup, not the first job, when a build broke
# On a GPU node (not while building an image): the pinned torch must see the GPU through this node's
# driver (a CUDA 13 build needs driver R580 or newer) and NCCL must run, or the node fails here, not the job.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  python - <<'PY'
import tempfile

import torch
import torch.distributed as dist

assert torch.cuda.is_available(), (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: "
                                   "is the driver older than that CUDA needs? (nvidia-smi shows the driver's CUDA)")
with tempfile.NamedTemporaryFile() as rendezvous:
    dist.init_process_group("nccl", store=dist.FileStore(rendezvous.name, 1), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    value = torch.ones(1, device="cuda")
    dist.all_reduce(value)
    torch.cuda.synchronize()
    dist.destroy_process_group()
print(f"GPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}: all-reduce ok")
PY
fi
