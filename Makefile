# `make test` and `make demo` do all set-up: they create (or reuse) .venv, install torch only
# if none is importable (a venv with system site packages sees a GPU machine's torch;
# otherwise torch==2.13.0, which here is a local CPU build), the tools, and this package.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mdp-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install test demo experiment clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q triton numpy pytest pytest-benchmark ninja "setuptools>=64" wheel tqdm pyyaml pillow matplotlib
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) -m mdp_train demo

# CamVid reproduction (benchmarks/results/camvid.md, ~2 h on 2 CPU cores; resumable).
# Smoke run: make experiment ARGS=--quick (writes camvid-quick.md instead).
experiment: $(STAMP)
	$(PY) -m mdp_train.experiment $(ARGS)

clean:
	rm -rf build *.egg-info mdp_kernels/*.so
