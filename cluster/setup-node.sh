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
pip install --quiet -c "$repo/constraints.txt" -e "$repo"
python -c "import ffcv, sparsedist.launch.train" # fail the node setup, not the first job, when a build broke
