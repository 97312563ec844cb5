# Quick start: `make train` (a real training job on CPU) and `make test`.
# Each target creates .venv and installs what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR ?= runs/quickstart
CPU8 := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

LIBTPU := .libtpu/.installed
CUDA_PLUGIN := .cuda_plugin/.installed

.PHONY: train test bench libtpu cuda_plugin

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(CPU8) $(PY) -m ul2x.train --gin_file=gin_configs/experiments/quickstart.gin \
	  --gin.MODEL_DIR="'$(MODEL_DIR)'"

# libtpu, the TPU compiler (the version jax pins), in its own folder: the tests compile
# the TPU kernels with it in a subprocess, and `--dry_run_topology` uses it via PYTHONPATH.
$(LIBTPU): $(STAMP)
	req="$$($(PY) -c 'import importlib.metadata as m, re, sys; \
	  r = [q.split(";")[0].strip() for q in m.requires("jax") or () if re.match(r"libtpu\b(?!-)", q)]; \
	  print(r[0]) if r else sys.exit("jax declares no libtpu requirement: pip install jax[tpu]")')" && \
	  $(PY) -m pip install -q --no-deps --upgrade --target .libtpu "$$req"
	touch $(LIBTPU)

libtpu: $(LIBTPU)

# JAX's CUDA plugin (the version of jax) and NVIDIA's ptxas, in their own folder: they
# compile for GPUs described by a target config on a machine without one
# (partitioning/topologies.py); the tests compile the Triton kernels with them in a
# subprocess, `--dry_run_topology=h100:8` via PYTHONPATH. No GPU, driver or CUDA toolkit.
$(CUDA_PLUGIN): $(STAMP)
	v="$$($(PY) -c 'import jax; print(jax.__version__)')" && \
	  $(PY) -m pip install -q --no-deps --upgrade --target .cuda_plugin \
	  "jax-cuda13-plugin==$$v" "jax-cuda13-pjrt==$$v" "nvidia-cuda-nvcc==13.5.37"
	touch $(CUDA_PLUGIN)

cuda_plugin: $(CUDA_PLUGIN)

test: $(STAMP) $(LIBTPU) $(CUDA_PLUGIN)
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(CPU8) $(PY) bench/train_step.py
