#!/usr/bin/env bash
# The accelerator checks of issues 12 and 13 as one prepared script, for a session that is
# lent the GPU machine (Python 3.12, jax 0.11.2, flax, optax, orbax, pytest; no gin-config,
# TensorFlow or seqio). Once, here, in the repository root, fetch gin-config's wheel:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp -d .whl gin-config==0.5.0
#
# Then one `run` per stage (each well inside the 10-minute limit), with carry [".whl"]:
#
#   bash bench/device.sh tests       # compiled flash and grouped-matmul kernels against
#                                    # their references
#   bash bench/device.sh attention   # bench/attention.py: flash, xla, cudnn TFLOP/s, then
#                                    # bench/grouped_matmul.py: Pallas against ragged_dot
#   bash bench/device.sh mfu         # bench/mfu.py: ~1B dense and MoE MFU, memory peak
#   bash bench/device.sh moe         # bench/mfu.py: the dropless MoE twin, Pallas grouped
#                                    # matmul against ragged_dot in the whole model
#
# Outputs go to $OUT (the device tool brings them back), else to /tmp/ul2x-device.
set -euo pipefail
stage=${1:?usage: bash bench/device.sh tests|attention|mfu|moe}
out=${OUT:-/tmp/ul2x-device}
mkdir -p "$out" /tmp/pkg
if ! compgen -G ".whl/gin_config-*.whl" >/dev/null; then
  echo "no .whl/gin_config-*.whl: fetch it here first (this script's header) and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
ln -sfn "$PWD" /tmp/pkg/ul2x  # the package is the repository root (pyproject's package-dir)
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
case "$stage" in
  tests)  # tests/conftest.py defaults to 8 CPU devices: ask for the GPU explicitly
    JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 XLA_FLAGS= python3 -m pytest -q \
      -p no:cacheprovider -m gpu tests/test_flash_attention.py \
      tests/test_grouped_matmul_pallas.py 2>&1 | tee "$out/tests.log" ;;
  attention)  # the JSON result to NAME.json, progress lines and errors to NAME.log
    python3 bench/attention.py 2>&1 >"$out/attention.json" | tee "$out/attention.log"
    python3 bench/grouped_matmul.py 2>&1 >"$out/grouped_matmul.json" \
      | tee "$out/grouped_matmul.log" ;;
  mfu)
    python3 bench/mfu.py 2>&1 >"$out/mfu.json" | tee "$out/mfu.log" ;;
  moe)
    python3 bench/mfu.py --models moe_1b_8e_dropless,moe_1b_8e_dropless_ragged_dot \
      --remats dots_saveable 2>&1 >"$out/moe.json" | tee "$out/moe.log" ;;
  *)
    echo "unknown stage '$stage': use tests, attention, mfu or moe" >&2; exit 2 ;;
esac
