# `make test` and `make demo` do all set-up: they create (or reuse) .venv, install torch only
# if none is importable, the tools, and this package. How torch is found: .venv is made by
# $(PYTHON) (tools/make_venv.py) and sees, after its own packages, those of $(PYTHON)'s
# environment when that is a venv (a .pth file) and the base interpreter's site packages;
# so a GPU machine's torch is reused, and only where none is importable does pip install
# torch==2.13.0 (here a local CPU build). MAX_JOBS (parallel compile jobs) defaults to nproc.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mdp-installed
# ninja (installed into the venv) must be on PATH for parallel, incremental extension builds.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Offline machines: wheels placed in wheels/ (git-ignored; see README, GPU) are found by pip.
ifneq ($(wildcard wheels/*.whl),)
export PIP_FIND_LINKS := $(abspath wheels)
endif
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install test demo bench experiment experiment2 clean check-cuda gpu-check

$(PY):
	$(PYTHON) tools/make_venv.py $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q ninja "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# Compiles csrc/cuda/*.cu with nvcc for sm_80 and sm_90 without a GPU (skips without nvcc).
# Several minutes on 2 cores, so `make test` compiles one file (tests/test_cuda_build.py).
check-cuda: $(STAMP)
	$(PY) tools/check_cuda.py -j $(MAX_JOBS)

# GPU readiness in one command (tools/gpu_check.py, <= 8 min): env, build, GPU tests,
# compute-sanitizer, the gpu-check benchmark preset; without a GPU the same stages in dry
# mode (interpreter, tiny preset). Results under benchmarks/results/gpu-check-<gpu>/ (and
# $$OUT/gpu-check). It runs `make install` itself, under its deadline.
gpu-check:
	$(PYTHON) tools/gpu_check.py $(ARGS)

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

# Round 2 (issue 17: the fixed method, 11 arms x 3 seeds at 600 pretraining steps, ~3.3 h on
# an idle 2-core CPU). One committed JSON per finished (arm, seed) in
# benchmarks/results/camvid2/; rerunning skips those, so run it niced across sessions:
# nice -n 10 make experiment2. ARGS=--report-only rebuilds camvid2.md/.png from the JSONs;
# ARGS=--quick is the smoke run (camvid2-quick*); ARGS="--estimate 5" times this machine.
experiment2: $(STAMP)
	$(PY) -m mdp_train.camvid2 $(ARGS)

clean:
	rm -rf build *.egg-info mdp_kernels/*.so
