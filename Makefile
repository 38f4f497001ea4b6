# sparsedist developer entry points. `make setup` is idempotent: a stamp file records
# what was installed, so repeated runs return in about a second.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist

.PHONY: setup system-deps test demo bench gpu-check gpu-wheels gpu-stack-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned: ray[train] would otherwise pull a different build.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt numpy numba cython pkgconfig
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

system-deps:
	@if pkg-config --exists opencv4 2>/dev/null && [ -f /usr/include/turbojpeg.h ] \
	    && { [ -d /usr/share/datasets/fashion-mnist ] || ! command -v apt-get >/dev/null; }; then \
	  echo "system libraries present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	elif pkg-config --exists opencv4 2>/dev/null && [ -f /usr/include/turbojpeg.h ]; then \
	  echo "note: dataset-fashion-mnist not installed (needs root: apt-get install dataset-fashion-mnist)"; \
	else \
	  echo "FFCV needs system libraries: install them with" >&2; \
	  echo "  sudo apt-get install $(APT_PACKAGES)" >&2; \
	  echo "(other systems: OpenCV 4 with opencv4.pc, libjpeg-turbo, pkg-config)" >&2; \
	  exit 1; \
	fi

test: setup
	$(PY) -m pytest -q -x --timeout=900

demo: setup
	$(VENV)/bin/sparsedist demo

bench: setup
	$(VENV)/bin/sparsedist bench sparsity
	$(VENV)/bin/sparsedist bench data

# On a GPU machine, with its own python3 (no venv there): GPU tests and CUDA benchmarks into four
# result files ($OUT, else ./gpu-check). Missing packages come from wheels/ (make gpu-wheels, carried).
gpu-check:
	python3 -m sparsedist.gpu_check

# Here, with network: the cp312 manylinux wheels of what the GPU machine lacks (pydantic and its
# dependencies, about 3 MB), pinned to this venv's pydantic.
gpu-wheels:
	$(PY) -m pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --implementation cp --abi cp312 -d wheels "pydantic==$$($(PY) -c 'import pydantic; print(pydantic.VERSION)')"

# Here, with network: the GPU machine's own software (Python 3.12, torch 2.11, Triton 3.6; see the
# device tool's KINDS.md) in a venv of its own, running the method's tests and gpu-check's dry run on
# CPU, so that a difference between versions shows here rather than in scarce GPU time. numpy stays
# below 2.4 there: Triton 3.6's interpreter (CPU only; the GPU compiles the kernels) fails on numpy
# 2.5's scalar conversion. Pydantic comes from wheels/: installed by the dry run as on the GPU, and
# for the tests into a folder of its own.
GPU_STACK := .venv-gpu-stack
PY312 ?= python3.12
GPU_STACK_TESTS := tests/test_kernels.py tests/test_layer_selection.py tests/test_sparsity.py \
  tests/test_sparsity_distributed.py tests/test_compile.py tests/test_host_syncs.py tests/test_models.py \
  tests/test_controllers.py tests/test_gpu_check.py tests/test_gpu.py
gpu-stack-check: gpu-wheels
	test -x $(GPU_STACK)/bin/python || $(PY312) -m venv $(GPU_STACK)
	$(GPU_STACK)/bin/python -m pip install --quiet torch==2.11.0 triton==3.6.0 'numpy<2.4' scipy pyyaml pytest
	rm -rf $(GPU_STACK)/dry-run && OUT=$(GPU_STACK)/dry-run $(GPU_STACK)/bin/python -m sparsedist.gpu_check --dry-run
	$(GPU_STACK)/bin/python -m pip install --quiet --no-index --no-deps --upgrade --target $(GPU_STACK)/wheels wheels/*.whl
	PYTHONPATH=$(GPU_STACK)/wheels $(GPU_STACK)/bin/python -m pytest -q -p no:cacheprovider $(GPU_STACK_TESTS)

clean:
	rm -rf $(VENV) $(GPU_STACK) build *.egg-info
