"""Compiles the flash kernels' TPU (Mosaic) forward and backward for a TPU topology on a
machine without a TPU, with libtpu's compiler (`jax.experimental.topologies`), and
prints one JSON line per case. Run by tests/test_flash_attention.py in a subprocess
with libtpu on PYTHONPATH (`make libtpu` installs it into .libtpu):

  PYTHONPATH=.libtpu .venv/bin/python tests/tpu_compile.py v5e:2x2
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import test_flash_attention as t
from ul2x import partitioning
from ul2x.kernels.attention_inputs import PositionBias
from ul2x.model import attention


def compile_case(device, case) -> dict:
  """Compiles jit(grad) of the kernel's out and lse w.r.t. q, k, v and the table."""
  (q, k, v, table), _, tokens = t._inputs(case)

  def loss(q, k, v, table, q_tok, kv_tok):
    out, lse = t._flash(case, q, k, v, table, q_tok, kv_tok, interpret=False,
                        block_sizes=None, platform="tpu")
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      (q, k, v, table, *tokens))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("tpu",))
  kernels = lowered.as_text().count("tpu_custom_call")
  compiled = lowered.compile()
  return dict(kernels=kernels, code_bytes=compiled.memory_analysis().generated_code_size_in_bytes)


def compile_model_path(devices, attend, case, mesh_axes: dict, x, tok) -> dict:
  """Compiles jit(grad) of a model attention function (model/attention.py) under a mesh of
  4 TPU devices with the standard rules, inputs sharded by `x` (q, k, v) and `tok`
  (per-token arrays): the kernels inside its shard_map, with checked varying axes."""
  (q, k, v, table), _, tokens = t._inputs(case)
  mesh = partitioning.create_mesh(**mesh_axes, devices=devices[:4])

  def loss(q, k, v, table, q_tok, kv_tok):
    with partitioning.axis_rules(mesh, t.MESH_RULES):
      out = attend(q, k, v, bias=PositionBias(table, t._relative_bias(case)),
                   **t._mask_kwargs(case, q_tok, kv_tok))
    return jnp.sum(out.astype(jnp.float32))

  put = lambda spec: lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
      mesh, spec))
  heads = P(x[2]) if len(x) > 2 else P()  # the bias table is split over heads like q
  args = (*map(put(x), (q, k, v)), put(heads)(table),
          *(jax.tree.map(put(tok), t_) for t_ in tokens))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("tpu",))
  compiled = lowered.compile()
  return dict(kernels=lowered.as_text().count("tpu_custom_call"),
              all_gathers=compiled.as_text().count("all-gather"))


def main(topology: str):
  devices = topologies.get_topology_desc(topology, platform="tpu").devices
  device = devices[0]
  for name, case in t.CASES.items():
    length = 1000  # padded: 2 tiles of the forward's default blocks, 4 of the backward's
    sized = dataclasses.replace(case, q_len=length * case.q_len // case.kv_len, kv_len=length)
    print(json.dumps(dict(topology=topology, device_kind=device.device_kind, case=name,
                          length=length, **compile_case(device, sized))), flush=True)
  flash = compile_model_path(devices, attention.flash_dot_product_attention, t.SHARDED_CASE,
                             dict(data=2, tensor=2), P("data", None, "tensor"), P("data"))
  ring_case = dataclasses.replace(t.SHARDED_CASE, kv_heads=4, q_len=512, kv_len=512)
  ring = compile_model_path(devices, attention.ring_dot_product_attention, ring_case,
                            dict(data=1, sequence=4), P(None, "sequence"),
                            P(None, "sequence"))
  for name, result in (("model-flash-sharded", flash), ("model-ring", ring)):
    print(json.dumps(dict(topology=topology, device_kind=device.device_kind, case=name,
                          **result)), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
