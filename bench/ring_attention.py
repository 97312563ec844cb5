"""Ring attention: per-device memory against sequence length and devices, longest
trainable length under a memory budget, causal load balance, and step time against
the reference attention. Prints JSON.

Memory comes from XLA's analysis of compiled (never run) programs, so lengths far
beyond the host's memory can be measured: the forward + backward of one causal
attention layer with a T5 relative bias, as the model calls it
(`ring_dot_product_attention` under `axis_rules`, length split over `sequence`), and
the whole train step of a small decoder-only model (`MODEL`) with `attention='ring'`.
Run on 8 simulated devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python bench/ring_attention.py --plot docs/ring_attention_memory.png

(--plot needs matplotlib, which is not a dependency of ul2x.)
"""

import argparse
import dataclasses
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ul2x import partitioning
from ul2x.kernels import ring_attention as ring
from ul2x.kernels.attention_inputs import PositionBias
from ul2x.model import TransformerConfig
from ul2x.model.attention import RING_BLOCK_SIZE, dot_product_attention, ring_dot_product_attention
from ul2x.model.position import T5BucketBias
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

RULES = partitioning.standard_logical_axis_rules()
BIAS = T5BucketBias(num_buckets=32, max_distance=128, bidirectional=False)
MiB = 2 ** 20
MODEL = TransformerConfig(  # prefix-LM, RoPE, rematerialized layers
    architecture="decoder_only", emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512,
    num_decoder_layers=4, activation="silu", position="rope", attention="ring", remat=True)


def _layer_grad(attention_fn, mesh, causal=True):
  """jit of (q, k, v, ct, segment ids, positions, bias table) -> (dq, dk, dv, dtable) of
  sum(attention * ct), with [batch, length, ...] inputs sharded as the rules say."""
  def loss(q, k, v, table, ct, seg, pos):
    bias = PositionBias(table, BIAS)
    if attention_fn is dot_product_attention:
      bias = bias(pos, pos)
    with partitioning.axis_rules(mesh, RULES):
      out = attention_fn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                         kv_positions=pos, causal=causal, bias=bias)
    return jnp.sum(out * ct)

  act = NamedSharding(mesh, partitioning.logical_to_spec(
      ("batch", "length", "heads", "kv"), RULES, dict(mesh.shape)))
  tok = NamedSharding(mesh, partitioning.batch_spec(RULES, mesh))
  rep = NamedSharding(mesh, PartitionSpec())
  shardings = (act, act, act, rep, act, tok, tok)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), in_shardings=shardings), shardings


def _abstract_inputs(shardings, batch, length, heads, head_dim):
  x = (batch, length, heads, head_dim)
  shapes = [(x, jnp.float32)] * 3 + [((heads, BIAS.num_buckets), jnp.float32),
                                     (x, jnp.float32), ((batch, length), jnp.int32),
                                     ((batch, length), jnp.int32)]
  return [jax.ShapeDtypeStruct(s, d, sharding=sh) for (s, d), sh in zip(shapes, shardings)]


def _mesh(n: int, **axes):
  return partitioning.create_mesh(**axes, devices=jax.devices()[:n])


def memory(attention_fn, n: int, length: int, batch: int, heads: int, head_dim: int) -> dict:
  """Per-device bytes of the compiled forward + backward on `n` devices (sequence=n)."""
  fn, shardings = _layer_grad(attention_fn, _mesh(n, sequence=n))
  stats = fn.lower(*_abstract_inputs(shardings, batch, length, heads, head_dim)).compile()
  stats = stats.memory_analysis()
  return {"devices": n, "length": length, "temp_mib": stats.temp_size_in_bytes / MiB,
          "argument_mib": stats.argument_size_in_bytes / MiB, "total_mib": _total_mib(stats)}


def _total_mib(stats) -> float:
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes) / MiB


def model_memory(n: int, length: int) -> dict:
  """Per-device MiB of MODEL's compiled train step (Adafactor, donated state) on one
  sequence of `length` tokens split over sequence=n."""
  mesh = _mesh(n, sequence=n)
  job = setup(MODEL, mesh=mesh, rules=RULES, optimizer=create_optimizer(1000))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       job.abstract_state(), job.shardings)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=job.batch_sharding)
  batch = {name: tokens for name in ("decoder_input_tokens", "decoder_target_tokens",
                                     "decoder_loss_weights", "decoder_causal_attention")}
  step = job.train_step()
  stats = step.lower(state, batch).compile().memory_analysis()
  return {"devices": n, "length": length, "temp_mib": stats.temp_size_in_bytes / MiB,
          "total_mib": _total_mib(stats)}


def longest_length(n: int, budget_mib: float, total_mib) -> dict:
  """The longest length (a multiple of 2 x n x block, so tiles align with the zigzag
  chunks) for which `total_mib(n, length)` fits `budget_mib` per device."""
  unit = 2 * n * RING_BLOCK_SIZE

  def fits(m: int) -> bool:
    return total_mib(n, m * unit) <= budget_mib

  low, high = 0, 1
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return {"devices": n, "budget_mib": budget_mib, "longest_length": low * unit}


def computed_tiles(n: int, length: int, tile: int, zigzag: bool) -> dict:
  """Causal tiles a device computes per ring step (those where some query sees some
  key), from positions alone: the critical path is the sum over steps of the busiest
  device, which is what real devices wait for."""
  pos = np.arange(length)
  if zigzag:
    pos = np.asarray(ring.zigzag(jnp.asarray(pos)[None], n)[0])
  blocks = pos.reshape(n, -1, tile)  # [device, tile, token]
  work = np.zeros((n, n), int)  # [step, device]
  for step in range(n):
    for device in range(n):
      q, kv = blocks[device], blocks[(device - step) % n]
      work[step, device] = int(np.sum(kv.min(axis=1)[None, :] <= q.max(axis=1)[:, None]))
  return {"devices": n, "layout": "zigzag" if zigzag else "contiguous",
          "total_tiles": int(work.sum()), "critical_path_tiles": int(work.max(axis=1).sum()),
          "ideal_tiles": float(work.sum() / n)}


def step_times(batch: int, length: int, heads: int, head_dim: int, repeats: int) -> dict:
  """Forward + backward seconds on 8 devices for the same global problem: the reference
  with the batch over data=8, ring attention with the length over sequence=8 (zigzag)."""
  n = len(jax.devices())
  key = jax.random.split(jax.random.key(0), 5)
  q, k, v, ct = (jax.random.normal(kk, (batch, length, heads, head_dim)) for kk in key[:4])
  table = jax.random.normal(key[4], (heads, BIAS.num_buckets))
  seg = jnp.ones((batch, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  zz = lambda x: ring.zigzag(x, n)
  runs = {}
  for causal in (True, False):
    kind = "causal" if causal else "bidirectional"
    for name, fn, mesh, layout in (
        ("reference", dot_product_attention, _mesh(n, data=n), lambda x: x),
        ("ring", ring_dot_product_attention, _mesh(n, data=1, sequence=n), zz)):
      f, shardings = _layer_grad(fn, mesh, causal)
      args = [jax.device_put(x, s) for x, s in zip(
          (layout(q), layout(k), layout(v), table, layout(ct), layout(seg), layout(pos)),
          shardings)]
      jax.block_until_ready(f(*args))
      runs[f"{kind}/{name}"] = (f, args)
  seconds = {name: [] for name in runs}
  for _ in range(repeats):  # interleaved, so load from other processes hits all alike
    for name, (f, args) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      seconds[name].append(time.perf_counter() - start)
  med = {name: statistics.median(s) for name, s in seconds.items()}
  return {"batch": batch, "length": length, "heads": heads, "head_dim": head_dim,
          "devices": n, "repeats": repeats, "median_seconds": med,
          "ring_over_reference": {kind: med[f"{kind}/ring"] / med[f"{kind}/reference"]
                                  for kind in ("causal", "bidirectional")}}


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for n in sorted({r["devices"] for r in result["memory"]}):
    rows = [r for r in result["memory"] if r["devices"] == n]
    left.plot([r["length"] for r in rows], [r["total_mib"] for r in rows], "o-",
              label=f"ring, N={n}")
  ref = result["reference_memory"]
  left.plot([r["length"] for r in ref], [r["total_mib"] for r in ref], "k--",
            label="reference (dense), N=1")
  left.set(xscale="log", yscale="log", xlabel="total length L",
           ylabel="per-device MiB (fwd+bwd)", title="one causal attention layer")
  left.legend()
  for key, label in (("longest_length", "one attention layer"),
                     ("model_longest_length", "whole train step")):
    rows = result[key]
    right.plot([r["devices"] for r in rows],
               [r["longest_length"] / rows[0]["longest_length"] for r in rows], "o-",
               label=f"{label} ({rows[0]['budget_mib']:.0f} MiB)")
  devices = [r["devices"] for r in rows]
  right.plot(devices, devices, "k:", label="linear")
  right.set(xlabel="devices N (sequence axis)", ylabel="longest L / longest L at N=1",
            title="longest length within a per-device budget")
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="32768,65536,131072,262144")
  parser.add_argument("--budget_mib", type=float, default=1024.0)
  parser.add_argument("--model_lengths", default="16384,65536")
  parser.add_argument("--model_budget_mib", type=float, default=2048.0)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--plot", default=None, help="write the memory figure (PNG) here")
  args = parser.parse_args()
  shape = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim)
  lengths = [int(x) for x in args.lengths.split(",")]
  devices = [n for n in (1, 2, 4, 8) if n <= len(jax.devices())]
  layer_mib = lambda n, length: memory(ring_dot_product_attention, n, length,
                                       **shape)["total_mib"]
  model_mib = lambda n, length: model_memory(n, length)["total_mib"]
  result = {
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "jax_devices": len(jax.devices()), "backend": jax.default_backend(),
      "layer": dict(**shape, causal=True, bias="T5 relative", dtype="float32",
                    block_size=RING_BLOCK_SIZE),
      "memory": [memory(ring_dot_product_attention, n, length, **shape)
                 for n in devices for length in lengths],
      "reference_memory": [memory(dot_product_attention, 1, length, **shape)
                           for length in lengths],
      "longest_length": [longest_length(n, args.budget_mib, layer_mib) for n in devices],
      "model": dataclasses.asdict(MODEL),
      "model_memory": [model_memory(n, length) for n in devices
                       for length in map(int, args.model_lengths.split(","))],
      "model_longest_length": [longest_length(n, args.model_budget_mib, model_mib)
                               for n in devices],
      "load_balance": [computed_tiles(n, 16 * n * RING_BLOCK_SIZE, RING_BLOCK_SIZE, zz)
                       for n in devices if n > 1 for zz in (False, True)],
      "step_time": step_times(8, 2048, 4, 32, args.repeats),
  }
  print(json.dumps(result, indent=1))
  if args.plot:
    plot(result, args.plot)


if __name__ == "__main__":
  main()
