"""The kernels' cases that tests/ and bench/ share, so neither imports the other: flash
attention's (`Case`, `CASES`, `SHARDED_CASE`; their inputs, mask arguments and the kernel
called on them) and the grouped matmul's group sizes, each compiled for a compile-only
device (partitioning/topologies.py) with the platform's own compiler."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ul2x.kernels import flash_attention as flash
from ul2x.kernels.attention_inputs import Tokens
from ul2x.model.position import T5BucketBias, relative_position_bucket
from ul2x.partitioning.topologies import lowering_platform

BLOCKS = flash.BlockSizes(16, 16, 16, 16)  # several tiles, lengths not multiples of 16
NUM_BUCKETS, MAX_DISTANCE = 32, 64
KERNEL_CALLS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


@dataclasses.dataclass(frozen=True)
class Case:
  mask: str  # "bidirectional", "causal" or "prefix"
  bias: bool = True
  packed: bool = True  # two segments and padding per row; else one unpadded segment
  dtype: str = "float32"
  head_dim: int = 64
  heads: int = 2
  kv_heads: int = 2
  q_len: int = 37
  kv_len: int = 37
  batch: int = 2


CASES = {
    "causal-bias-packed": Case("causal"),
    "prefix-bias-packed-gqa": Case("prefix", heads=4, kv_heads=1, batch=1),
    "bidirectional-bias-cross-d128": Case("bidirectional", head_dim=128, q_len=21, batch=1),
    "causal-plain-bf16-gqa-d128": Case("causal", bias=False, packed=False, dtype="bfloat16",
                                       head_dim=128, heads=4, batch=1),
}
# The model's flash path under a sharded mesh: batch and heads to split.
SHARDED_CASE = Case("prefix", heads=4, kv_heads=2, head_dim=16, q_len=40, kv_len=40, batch=4)


def tokens(case: Case, length: int) -> Tokens:
  """Segment ids (0 = padding), positions restarting per segment, prefix flags."""
  seg = np.ones((case.batch, length), np.int32)
  if case.packed:
    seg[0, length // 3:] = 2
    seg[-1, length // 2:] = 3
    seg[:, length - 4:] = 0
  starts = np.maximum.accumulate(
      np.where(np.diff(seg, axis=1, prepend=-1) != 0, np.arange(length), 0), axis=1)
  pos = np.arange(length) - starts
  prefix = (pos < 5) & (seg > 0)
  return Tokens(jnp.asarray(seg), jnp.asarray(pos, jnp.int32), jnp.asarray(prefix, jnp.int32))


def inputs(case: Case):
  """((q, k, v, table), (cotangent of out, of lse: 0 on padding), (q tokens, kv tokens))."""
  keys = jax.random.split(jax.random.key(0), 6)
  dt = jnp.dtype(case.dtype)
  q = jax.random.normal(keys[0], (case.batch, case.q_len, case.heads, case.head_dim), dt)
  k, v = (jax.random.normal(key, (case.batch, case.kv_len, case.kv_heads, case.head_dim), dt)
          for key in keys[1:3])
  q_tok, kv_tok = tokens(case, case.q_len), tokens(case, case.kv_len)
  real = np.asarray(q_tok.segment_ids > 0)
  ct = jax.random.normal(keys[3], q.shape, jnp.float32) * real[..., None, None]
  ct_lse = jax.random.normal(keys[4], (case.batch, case.heads, case.q_len)) * real[:, None]
  table = jax.random.normal(keys[5], (case.heads, NUM_BUCKETS)) * 0.5
  return (q, k, v, table), (ct, ct_lse), (q_tok, kv_tok)


def relative_bias(case: Case) -> T5BucketBias:
  return T5BucketBias(NUM_BUCKETS, MAX_DISTANCE, case.mask == "bidirectional")


def mask_kwargs(case: Case, q_tok, kv_tok):
  prefix = case.mask == "prefix"
  return dict(q_segment_ids=q_tok.segment_ids, kv_segment_ids=kv_tok.segment_ids,
              q_positions=q_tok.positions, kv_positions=kv_tok.positions,
              causal=case.mask != "bidirectional", q_prefix=q_tok.prefix if prefix else None,
              kv_prefix=kv_tok.prefix if prefix else None, scale=0.3)


def run_flash(case: Case, q, k, v, table, q_tok, kv_tok, interpret=True, block_sizes=BLOCKS,
              platform=None):
  """(out, lse) of kernels/flash_attention.py on the case's mask and bias."""
  rel = relative_bias(case)
  buckets = functools.partial(relative_position_bucket, bidirectional=rel.bidirectional,
                              num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)
  return flash.flash_attention(
      q, k, v, bias_table=table if case.bias else None,
      bucket_fn=buckets if case.bias else None, block_sizes=block_sizes, interpret=interpret,
      platform=platform, return_lse=True, **mask_kwargs(case, q_tok, kv_tok))


def lower(fn, args, device):
  """fn(*args) lowered for `device`'s platform (jax names the GPU one 'cuda')."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering_platform(device),))


def compile_flash(device, case: Case, block_sizes=None) -> dict:
  """Compiles jit(grad) of the kernel's out and lse w.r.t. q, k, v and the table, at
  `block_sizes` (None: the platform's defaults)."""
  (q, k, v, table), _, toks = inputs(case)

  def loss(q, k, v, table, q_tok, kv_tok):
    out, lse = run_flash(case, q, k, v, table, q_tok, kv_tok, interpret=False,
                         block_sizes=block_sizes, platform=device.platform)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      (q, k, v, table, *toks))
  lowered = lower(jax.grad(loss, argnums=(0, 1, 2, 3)), args, device)
  kernels = lowered.as_text().count(KERNEL_CALLS[device.platform])
  compiled = lowered.compile()
  return dict(kernels=kernels, code_bytes=compiled.memory_analysis().generated_code_size_in_bytes)


def group_sizes(rows: int, groups: int, skew: float, seed: int = 0):
  """`rows` split over `groups`: evenly (skew 0), or with expert weights from a
  Dirichlet of concentration 1/skew; every row in some group."""
  if skew == 0:
    weights = np.full(groups, 1 / groups)
  else:
    weights = np.random.default_rng(seed).dirichlet(np.full(groups, 1 / skew))
  sizes = np.floor(weights * rows).astype(np.int32)
  sizes[np.argmax(sizes)] += rows - sizes.sum()
  return jnp.asarray(sizes)


def compile_grouped_matmul(impl: str, matmul, device, rows: int, k: int, n: int, groups: int,
                           skew: float) -> dict:
  """Compiles forward+backward of the grouped matmul `matmul` (named `impl`) for a
  compile-only `device` (a TPU topology's or a GPU target's): XLA's FLOPs over the dense
  count (TPU; XLA:GPU gives none), the dense [G, K, N] products, the Pallas dW kernels,
  temporaries."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
          for shape in ((rows, k), (groups, k, n))]
  sizes = group_sizes(rows, groups, skew)
  loss = lambda x, w: jnp.sum(matmul(x, w, sizes).astype(jnp.float32) ** 2)
  compiled = lower(jax.value_and_grad(loss, argnums=(0, 1)), args, device).compile()
  lines = compiled.as_text().splitlines()
  flops = (compiled.cost_analysis() or {}).get("flops")
  dense = f" = bf16[{groups},{k},{n}]"
  return {"impl": impl, "rows": rows, "k": k, "n": n, "groups": groups, "skew": skew,
          "xla_flops_over_dense": flops and flops / (6 * rows * k * n),
          "dense_group_products": sum(dense in line and "custom-call(" not in line and (
              "convolution" in line or "dot" in line) for line in lines),
          "dw_kernels": sum("grouped_matmul_weight_grad" in line and "custom-call(" in line
                            for line in lines),
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
