# Two entry points: `make demo` (the main job) and `make test` (the suite). Both build .venv on first use.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build that installs from local disk; where
# `nvidia-smi` works, an already-installed torch is kept (or set TORCH_SPEC to choose one).
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_ARGS ?=
# The repo's kernels/ folder installs as fastpeft.kernels; with the repo root first on sys.path (what `python -m` and
# `python -c` do from here) it would shadow Hugging Face's `kernels` package that transformers and bitsandbytes
# import. PYTHONSAFEPATH keeps the working directory off sys.path in these commands and every process they start.
RUN := PYTHONSAFEPATH=1 $(PY)

.PHONY: venv install install-into-python lint test test-dist demo bench gpu-check clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.deps: requirements-dev.txt | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The package (and its C++ extension) is rebuilt whenever sources change; --no-build-isolation keeps the build on
# the torch installed above instead of fetching another.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# ruff's rules and target live in pyproject.toml; the suite runs only on a tree that passes them.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

test: install lint
	$(RUN) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

# Only the multi-process (gloo) DDP/FSDP2 tests (also part of `make test`): handy when working on them.
test-dist: install
	$(RUN) -m pytest -q -p no:cacheprovider -m dist $(PYTEST_ARGS) tests

demo: install
	$(RUN) -m fastpeft.demo

bench: install
	$(RUN) -m pytest -q benchmarks --benchmark-only

# Everything that needs a CUDA GPU in one call (gpu tests, the GPU timing grid, BENCHMARKS.md's measured-GPU
# section); without a GPU it says so and exits 0. `make gpu-check PY=python3` uses a python that already holds a CUDA
# torch, triton, peft and transformers (an offline GPU machine): fastpeft is installed into it without a virtual
# environment and without fetching anything. GPU_CHECK_ARGS passes options on (`--out DIR` for the log and results).
ifeq ($(PY),$(VENV)/bin/python)
gpu-check: install
else
gpu-check: install-into-python
endif
	$(RUN) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Rebuilt only when sources change (a stamp per python), so the check's own call of it costs nothing after a build.
PY_STAMP := build/.installed-into-$(subst /,_,$(PY))
install-into-python: $(PY_STAMP)

$(PY_STAMP): setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
	mkdir -p build && touch $@

clean:
	rm -rf $(VENV) build *.egg-info fastpeft/*.so
