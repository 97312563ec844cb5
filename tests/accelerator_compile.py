"""Compiles, for a TPU topology or GPUs this machine does not have (compile-only devices,
partitioning/topologies.py), with the platform's own compiler: the flash kernels'
forward and backward (Mosaic on TPU, Triton on GPU), the model's flash path and ring in
their shard_maps, the grouped matmul (ragged_dot and 'pallas'), and the dropless MoE
layer with 'pallas'. Prints one JSON line per case. Run by tests/test_flash_attention.py
in a subprocess, with libtpu or JAX's CUDA plugin on PYTHONPATH (`make libtpu`,
`make cuda_plugin`):

  PYTHONPATH=.libtpu .venv/bin/python tests/accelerator_compile.py v5e:2x2
  PYTHONPATH=.cuda_plugin .venv/bin/python tests/accelerator_compile.py h200:4
"""

import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import test_moe_dropless
from ul2x import partitioning
from ul2x.kernels.attention_inputs import PositionBias
from ul2x.model import attention
from ul2x.model import kernel_cases as cases
from ul2x.model.moe import GROUPED_MATMULS, select_grouped_matmul
from ul2x.partitioning.topologies import gpu_target, topology_devices


def compile_model_path(devices, attend, case, mesh_axes: dict, x, tok) -> dict:
  """Compiles jit(grad) of a model attention function (model/attention.py) under a mesh of
  `mesh_axes` with the standard rules, inputs sharded by `x` (q, k, v) and `tok`
  (per-token arrays): the kernels inside its shard_map, with checked varying axes."""
  (q, k, v, table), _, tokens = cases.inputs(case)
  mesh = partitioning.create_mesh(**mesh_axes, devices=devices[:math.prod(mesh_axes.values())])

  def loss(q, k, v, table, q_tok, kv_tok):
    with partitioning.axis_rules(mesh, partitioning.standard_logical_axis_rules()):
      out = attend(q, k, v, bias=PositionBias(table, cases.relative_bias(case)),
                   **cases.mask_kwargs(case, q_tok, kv_tok))
    return jnp.sum(out.astype(jnp.float32))

  put = lambda spec: lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
      mesh, spec))
  heads = P(x[2]) if len(x) > 2 else P()  # the bias table is split over heads like q
  args = (*map(put(x), (q, k, v)), put(heads)(table),
          *(jax.tree.map(put(tok), t_) for t_ in tokens))
  lowered = cases.lower(jax.grad(loss, argnums=(0, 1, 2, 3)), args, devices[0])
  compiled = lowered.compile()
  return dict(kernels=lowered.as_text().count(cases.KERNEL_CALLS[devices[0].platform]),
              all_gathers=compiled.as_text().count("all-gather"))


def compile_dropless_moe(devices, impl: str, mesh_axes: dict) -> dict:
  """Compiles value_and_grad of the dropless MoE layer (tests/test_moe_dropless.py's)
  with `moe_matmul=impl` on 4 devices, the varying-axes check on: how often the Pallas
  dW kernel appears, and the compiled step's temporaries."""
  mesh = partitioning.create_mesh(**mesh_axes, devices=devices[:4])
  moe = test_moe_dropless.layer("top2", moe_matmul=impl, emb_dim=256, mlp_dim=512)
  graphdef, state = nnx.split(moe)
  loss = test_moe_dropless.layer_loss(graphdef, jnp.ones((8, 64), jnp.int32),
                                      test_moe_dropless.RULES, mesh)
  put = lambda spec: lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
      mesh, spec))
  args = (jax.tree.map(put(P()), state), put(P())(jnp.zeros((8, 64, 256))))
  compiled = cases.lower(loss, args, devices[0]).compile()
  return dict(kernels=compiled.as_text().count("grouped_matmul_weight_grad"),
              temp_bytes=compiled.memory_analysis().temp_size_in_bytes)


def main(topology: str):
  devices = topology_devices(topology)
  if devices[0].platform == "gpu":
    with gpu_target(devices[0].device_kind):
      compile_all(topology, devices)
  else:
    compile_all(topology, devices)


def compile_all(topology: str, devices):
  device = devices[0]
  for name, case in cases.CASES.items():
    length = 1000  # padded: 2 tiles of the forward's default blocks, 4 of the backward's
    sized = dataclasses.replace(case, q_len=length * case.q_len // case.kv_len, kv_len=length)
    print(json.dumps(dict(topology=topology, device_kind=device.device_kind, case=name,
                          length=length, **cases.compile_flash(device, sized))), flush=True)
  sharded = cases.SHARDED_CASE
  flash = compile_model_path(devices, attention.flash_dot_product_attention, sharded,
                             dict(data=2, tensor=2), P("data", None, "tensor"), P("data"))
  one = compile_model_path(devices, attention.flash_dot_product_attention, sharded,
                           dict(data=1), P(), P())  # a shard_map over which nothing varies
  ring_case = dataclasses.replace(sharded, kv_heads=4, q_len=512, kv_len=512)
  ring = compile_model_path(devices, attention.ring_dot_product_attention, ring_case,
                            dict(data=1, sequence=4), P(None, "sequence"),
                            P(None, "sequence"))
  matmuls = {name: cases.compile_grouped_matmul(
      name, select_grouped_matmul(name, device.platform), device, rows=4096, k=1024, n=2048,
      groups=8, skew=1.0) for name in GROUPED_MATMULS}
  moe = [compile_dropless_moe(devices, "pallas", axes)
         for axes in (dict(data=2, expert=2), dict(expert=2, tensor=2))]
  for name, result in (("model-flash-sharded", flash), ("model-flash-one-device", one),
                       ("model-ring", ring),
                       *((f"grouped-matmul-{name}", r) for name, r in matmuls.items()),
                       ("model-moe-dropless-pallas-data2-expert2", moe[0]),
                       ("model-moe-dropless-pallas-expert2-tensor2", moe[1])):
    print(json.dumps(dict(topology=topology, device_kind=device.device_kind, case=name,
                          **result)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
