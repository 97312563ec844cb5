"""Grouped matmul of dropless MoE: the Pallas kernels (`moe_matmul='pallas'`,
kernels/grouped_matmul_pallas.py on GPU, kernels/grouped_matmul_tpu.py's dW on TPU)
against `jax.lax.ragged_dot`, on one accelerator: forward and forward+backward time and
TFLOP/s (counted as dense matmuls: 2*M*K*N forward, 3x that with the backward), bfloat16,
at MoE expert sizes with tokens spread evenly or skewed over the experts. On GPU also two
alternatives that jax ships, where the installed jax has them: ragged_dot with
`jax_ragged_dot_use_gpu_pallas_triton_lowering`, and the Hopper Mosaic GPU kernels of
`jax.experimental.pallas.ops.gpu` (forward and dX `ragged_dot_mgpu`, dW
`transposed_ragged_dot_mgpu`; untuned blocks). One JSON line per case on stderr, then the whole
result on stdout. Imports only kernels/, partitioning/ and model/ (the choice of grouped
matmul, model/moe.py; the cases it shares with the tests, model/kernel_cases.py).

On the GPU machine (gin-config installed in /tmp/site as for bench/mfu.py), from the
repository root:

  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ul2x
  PYTHONPATH=/tmp/pkg:/tmp/site python3 bench/grouped_matmul.py

Compile only, for a TPU or GPU from any machine (`make libtpu` / `make cuda_plugin`): the
dense products over all groups that XLA compiles (ragged_dot's dW on TPU; everything on
GPU), temporaries, and on TPU XLA's FLOP count of forward+backward against the dense count
3*2*M*K*N; no timing:

  PYTHONPATH=.libtpu JAX_PLATFORMS=cpu .venv/bin/python bench/grouped_matmul.py --topology v5e:2x2
  PYTHONPATH=.cuda_plugin JAX_PLATFORMS=cpu .venv/bin/python bench/grouped_matmul.py --topology h200:1

A check of the script on CPU (tiny shapes, the Pallas side in interpret mode; figures mean
nothing):

  JAX_PLATFORMS=cpu .venv/bin/python bench/grouped_matmul.py --smoke
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ul2x.model.kernel_cases import compile_grouped_matmul, group_sizes
from ul2x.model.moe import GROUPED_MATMULS, select_grouped_matmul
from ul2x.partitioning.topologies import topology_devices


def _mosaic_gpu_matmul():
  """jax's Hopper Mosaic GPU ragged dot as a grouped matmul with a VJP (a baseline)."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  blocks = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)

  @jax.custom_vjp
  def matmul(x, w, sizes):
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, **blocks)

  def backward(res, dout):
    x, w, sizes = res
    dout = dout.astype(x.dtype)
    dx = ragged_dot_mgpu.ragged_dot(dout, w, group_sizes=sizes, transpose_rhs=True, **blocks)
    dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dout, group_sizes=sizes,
                                                          **blocks)
    return dx, dw.astype(w.dtype), np.zeros(sizes.shape, jax.dtypes.float0)

  matmul.defvjp(lambda x, w, sizes: (matmul(x, w, sizes), (x, w, sizes)), backward)
  return matmul


def implementations(interpret: bool) -> dict:
  """name -> (grouped matmul, jax config updates while it is traced)."""
  backend = jax.default_backend()
  impls = {name: (select_grouped_matmul(name, backend, interpret), {})
           for name in GROUPED_MATMULS}
  if backend == "gpu":
    impls["ragged_dot_jax_triton"] = (
        select_grouped_matmul("ragged_dot", backend),
        {"jax_ragged_dot_use_gpu_pallas_triton_lowering": True})
    impls["jax_mosaic_gpu"] = (_mosaic_gpu_matmul(), {})
  return impls


def time_fn(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def run_case(impl: str, matmul, rows: int, k: int, n: int, groups: int, skew: float,
             steps: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
  w = jax.random.normal(keys[1], (groups, k, n), jnp.bfloat16) / jnp.bfloat16(np.sqrt(k))
  sizes = group_sizes(rows, groups, skew)
  loss = lambda x, w: jnp.sum(matmul(x, w, sizes).astype(jnp.float32) ** 2)
  forward = jax.jit(lambda x, w: matmul(x, w, sizes))
  train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  flops = 2 * rows * k * n
  fwd_s, train_s = time_fn(forward, (x, w), steps), time_fn(train, (x, w), steps)
  return {"impl": impl, "rows": rows, "k": k, "n": n, "groups": groups, "skew": skew,
          "largest_group": int(jnp.max(sizes)), "forward_ms": fwd_s * 1e3,
          "forward_tflops": flops / fwd_s / 1e12, "train_ms": train_s * 1e3,
          "train_tflops": 3 * flops / train_s / 1e12}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=16384, help="token choices (M)")
  parser.add_argument("--shapes", default="1536x4096,4096x1536",
                      help="K x N per expert: wi (d_model x hidden) and wo")
  parser.add_argument("--groups", default="8,64", help="experts on the device")
  parser.add_argument("--skews", default="0,1", help="0: even; else Dirichlet 1/skew")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--topology", help="compile only, for this TPU topology or GPU (e.g. "
                      "v5e:2x2, h200:1; partitioning/topologies.py)")
  args = parser.parse_args()
  device = None
  if args.topology:
    device = topology_devices(args.topology)[0]
  if args.smoke:
    args.rows, args.shapes, args.groups, args.steps = 64, "32x48", "4", 1
  results = []
  for shape in args.shapes.split(","):
    k, n = map(int, shape.split("x"))
    for groups in map(int, args.groups.split(",")):
      for skew in map(float, args.skews.split(",")):
        rows = {}
        impls = ({name: (select_grouped_matmul(name, device.platform), {})
                  for name in GROUPED_MATMULS} if device else implementations(args.smoke))
        for impl, (matmul, flags) in impls.items():
          saved = {name: getattr(jax.config, name) for name in flags}
          try:
            for name, value in flags.items():
              jax.config.update(name, value)
            rows[impl] = (compile_grouped_matmul(impl, matmul, device, args.rows, k, n, groups,
                                                 skew)
                          if device else
                          run_case(impl, matmul, args.rows, k, n, groups, skew, args.steps))
          except Exception as error:  # a kernel that fails to compile here: keep going
            rows[impl] = {"impl": impl, "error": " ".join(str(error).split())[:300]}
          finally:
            for name, value in saved.items():
              jax.config.update(name, value)
          base = rows["ragged_dot"]
          if impl != "ragged_dot" and "train_ms" in rows[impl] and "train_ms" in base:
            rows[impl]["train_speedup"] = base["train_ms"] / rows[impl]["train_ms"]
            rows[impl]["forward_speedup"] = base["forward_ms"] / rows[impl]["forward_ms"]
          print(json.dumps(rows[impl]), file=sys.stderr, flush=True)  # progress
        results.extend(rows.values())
  print(json.dumps({"bench": "grouped_matmul",
                    "device_kind": (device or jax.devices()[0]).device_kind,
                    "backend": jax.default_backend(), "jax": jax.__version__,
                    "results": results}, indent=2))


if __name__ == "__main__":
  main()
