# Quick start: `make train` (a real training job on CPU) and `make test`.
# Each target creates $(VENV) and installs the versions locked for its Python
# (locks/py3.X.txt; `make lock` refreshes them, docs/development.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK := locks/py$(PYVER).txt
MODEL_DIR ?= runs/quickstart
CPU8 := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# The second CI leg: Python 3.12 (pyenv's) with the newest libraries, in its own venv.
PYTHON312 ?= $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python)))

# The accelerator compilers match the venv's jax, so each venv has its own.
LIBTPU_DIR ?= $(if $(filter .venv,$(VENV)),.libtpu,$(VENV)/libtpu)
CUDA_PLUGIN_DIR ?= $(if $(filter .venv,$(VENV)),.cuda_plugin,$(VENV)/cuda_plugin)
LIBTPU := $(LIBTPU_DIR)/.installed
CUDA_PLUGIN := $(CUDA_PLUGIN_DIR)/.installed

.PHONY: train test test312 lock bench libtpu cuda_plugin

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(CPU8) $(PY) -m ul2x.train --gin_file=gin_configs/experiments/quickstart.gin \
	  --gin.MODEL_DIR="'$(MODEL_DIR)'"

# libtpu, the TPU compiler (the version jax pins), in its own folder: the tests compile
# the TPU kernels with it in a subprocess, and `--dry_run_topology` uses it via PYTHONPATH.
# Where PyPI has no such wheel yet (a jax newer than libtpu's releases), the folder says so
# in `unavailable` and the tests that need it skip with that reason.
$(LIBTPU): $(STAMP)
	rm -rf $(LIBTPU_DIR) && mkdir -p $(LIBTPU_DIR)
	req="$$($(PY) -c 'import importlib.metadata as m, re, sys; \
	  r = [q.split(";")[0].strip() for q in m.requires("jax") or () if re.match(r"libtpu\b(?!-)", q)]; \
	  print(r[0]) if r else sys.exit("jax declares no libtpu requirement: pip install jax[tpu]")')" && \
	  if $(PY) -m pip install -q --no-deps --target $(LIBTPU_DIR) "$$req" 2>/dev/null; then \
	    touch $(LIBTPU); \
	  else echo "pip could not install $$req, the libtpu of jax $$($(PY) -c 'import jax; print(jax.__version__)')" \
	    | tee $(LIBTPU_DIR)/unavailable >&2; fi

libtpu: $(LIBTPU)

# JAX's CUDA plugin (the version of jax) and NVIDIA's ptxas, in their own folder: they
# compile for GPUs described by a target config on a machine without one
# (partitioning/topologies.py); the tests compile the Triton kernels with them in a
# subprocess, `--dry_run_topology=h100:8` via PYTHONPATH. No GPU, driver or CUDA toolkit.
# Where PyPI has none for this jax, the folder says so in `unavailable`, as for libtpu.
$(CUDA_PLUGIN): $(STAMP)
	rm -rf $(CUDA_PLUGIN_DIR) && mkdir -p $(CUDA_PLUGIN_DIR)
	v="$$($(PY) -c 'import jax; print(jax.__version__)')" && \
	  if $(PY) -m pip install -q --no-deps --target $(CUDA_PLUGIN_DIR) "jax-cuda13-plugin==$$v" \
	      "jax-cuda13-pjrt==$$v" "nvidia-cuda-nvcc==13.5.37" 2>/dev/null; then \
	    touch $(CUDA_PLUGIN); \
	  else echo "pip could not install jax-cuda13-plugin==$$v, the CUDA plugin of jax $$v" \
	    | tee $(CUDA_PLUGIN_DIR)/unavailable >&2; fi

cuda_plugin: $(CUDA_PLUGIN)

test: $(STAMP) $(LIBTPU) $(CUDA_PLUGIN)
	UL2X_LIBTPU_DIR=$(LIBTPU_DIR) UL2X_CUDA_PLUGIN_DIR=$(CUDA_PLUGIN_DIR) \
	  $(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 --durations=15 tests

test312:
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 under ~/.pyenv/versions; pass PYTHON312=PATH." >&2; exit 2; }
	$(MAKE) test PYTHON=$(PYTHON312) VENV=.venv312

# Refreshes this Python's lock: a new venv with the newest versions pyproject.toml allows,
# frozen into $(LOCK), then the suite on it. Commit the new lock only if the suite passes.
lock:
	rm -rf $(VENV) $(LIBTPU_DIR) $(CUDA_PLUGIN_DIR)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip freeze --all --exclude-editable > $(LOCK)
	touch $(STAMP)
	$(MAKE) test

bench: $(STAMP)
	$(CPU8) $(PY) bench/train_step.py
