# `make test` and `make demo` do all set-up: they create (or reuse) .venv, install torch only
# if none is importable (a venv with system site packages sees a GPU machine's torch;
# otherwise torch==2.13.0, which here is a local CPU build), the tools, and this package.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mdp-installed
# ninja (installed into the venv) must be on PATH for parallel, incremental extension builds.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install test demo bench experiment clean check-cuda

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q triton numpy pytest pytest-benchmark hypothesis ninja "setuptools>=64" wheel tqdm pyyaml pillow matplotlib
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# Compiles csrc/cuda/*.cu with nvcc for sm_80 and sm_90 without a GPU (skips without nvcc).
# Several minutes on 2 cores, so `make test` compiles one file (tests/test_cuda_build.py).
check-cuda: $(STAMP)
	$(PY) tools/check_cuda.py -j 2

demo: $(STAMP)
	$(PY) -m mdp_train demo

# PRESET=tiny (seconds) | cpu-small (this machine, minutes) | paper (GPU)
PRESET ?= cpu-small
bench: $(STAMP)
	$(PY) -m benchmarks.run --preset $(PRESET)

# CamVid reproduction (benchmarks/results/camvid.md, ~2 h on 2 CPU cores; resumable).
# Smoke run: make experiment ARGS=--quick (writes camvid-quick.md instead).
experiment: $(STAMP)
	$(PY) -m mdp_train.experiment $(ARGS)

clean:
	rm -rf build *.egg-info mdp_kernels/*.so
