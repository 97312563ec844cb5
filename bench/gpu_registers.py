"""Registers and spills of the Triton flash kernels per block-size choice, for a GPU this
machine need not have: each configuration's forward and backward compile for the target
(partitioning/topologies.py, XLA's GPU compiler from JAX's CUDA plugin), and NVIDIA's
ptxas (`-v`) reports per kernel the registers it uses and the bytes it spills to local
memory. Spills in a kernel's inner loop cost memory traffic on every tile, so the GPU
defaults (kernels/flash_attention.py) are chosen to spill nothing here; whether they
are also the fastest is for a device to time (bench/attention.py). Prints JSON.

  make cuda_plugin
  PYTHONPATH=.cuda_plugin JAX_PLATFORMS=cpu XLA_FLAGS=--xla_dump_to=/tmp/ptx \\
    .venv/bin/python bench/gpu_registers.py
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import jax

from ul2x.kernels import flash_attention as flash
from ul2x.kernels.flash_kernels import BlockSizes
from ul2x.model.kernel_cases import CASES, compile_flash
from ul2x.partitioning.topologies import topology_devices

PTXAS = pathlib.Path(__file__).parents[1] / ".cuda_plugin/nvidia/cu13/bin/ptxas"
CHOICES = [  # (q, kv, q_bwd, kv_bwd), num_warps
    ((128, 64, 64, 64), 4), ((128, 64, 64, 64), 8), ((128, 64, 32, 64), 8),
    ((128, 32, 32, 64), 8), ((64, 32, 32, 32), 8)]


def compile_case(device, dtype: str, head_dim: int, bias: bool, blocks, warps: int):
  flash.NUM_WARPS = warps
  case = dataclasses.replace(CASES["causal-bias-packed"], dtype=dtype, head_dim=head_dim,
                             bias=bias, q_len=2048, kv_len=2048, batch=1)
  compile_flash(device, case, BlockSizes(*blocks))


def kernel_stats(ptx_files, gpu_name: str) -> dict:
  """{kernel: {registers, spill_bytes}} of the flash kernels in these PTX files."""
  stats = {}
  for path in ptx_files:
    if ".entry flash_attention" not in path.read_text():  # XLA's own fusions
      continue
    report = subprocess.run([str(PTXAS), "-v", "--gpu-name", gpu_name, str(path), "-o",
                             os.devnull], capture_output=True, text=True, check=True).stderr
    for name, body in re.findall(r"entry function '(flash_attention_\w+)'(.*?)(?=entry "
                                 r"function|\Z)", report, re.S):
      stats[name] = {"registers": int(re.search(r"Used (\d+) registers", body).group(1)),
                     "spill_bytes": int(re.search(r"(\d+) bytes spill stores", body).group(1))}
  return stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="h200:1")
  parser.add_argument("--gpu_name", default="sm_90a", help="ptxas target of the topology")
  args = parser.parse_args()
  dump = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
  if not dump or not PTXAS.is_file():
    sys.exit("set XLA_FLAGS=--xla_dump_to=DIR and run `make cuda_plugin` (ptxas) first.")
  dump = pathlib.Path(dump.group(1))
  device = topology_devices(args.topology)[0]
  rows = []
  for dtype, head_dim, bias in (("bfloat16", 64, True), ("bfloat16", 64, False),
                                ("bfloat16", 128, True), ("bfloat16", 128, False)):
    for blocks, warps in CHOICES:
      seen = set(dump.glob("*.ptx"))
      compile_case(device, dtype, head_dim, bias, blocks, warps)
      rows.append({"dtype": dtype, "head_dim": head_dim, "bias": bias, "blocks": blocks,
                   "num_warps": warps,
                   **kernel_stats(sorted(set(dump.glob("*.ptx")) - seen), args.gpu_name)})
      print(json.dumps(rows[-1]), flush=True)
  print(json.dumps({"bench": "gpu_registers", "device_kind": device.device_kind,
                    "jax": jax.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
