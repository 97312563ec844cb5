"""Flash attention in Pallas: forward and backward kernels with ul2x's mask and bias.

q: [batch, q_len, heads, head_dim], k/v: [batch, kv_len, kv_heads, head_dim]
(grouped-query when kv_heads divides heads: query head i reads key/value head
i // (heads // kv_heads)). Masks come from per-token segment ids (0 = padding),
positions and prefix-LM flags, by kernels/attention_inputs.py's `visible`. A T5
relative position bias is computed per tile from its table [heads, num_buckets]
and `bucket_fn(key_position - query_position)`, never as an [L, L] tensor; the
backward kernel returns the table's gradient as per-bucket sums of dS.

Lengths are padded internally to the block sizes (padding tokens get segment 0).
Tiles in which no query can see any key (causal order, disjoint segments, all
padding) are skipped, decided from per-tile minima and maxima. Two kernel families
with the same semantics: Triton for GPU (the bodies in kernels/flash_kernels.py) and
Mosaic for TPU (kernels/flash_tpu.py), each also run with `interpret=True` on CPU
(chosen automatically there). Query rows that see no key are 0 with log-sum-exp -inf.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ul2x.kernels import flash_kernels as kernels
from ul2x.kernels import flash_tpu
from ul2x.kernels.attention_inputs import Tokens
from ul2x.kernels.flash_kernels import SQ, BlockSizes, pad, token_arrays
from ul2x.kernels.utils import fit, out_shapes, padded, sum_unvarying, triton_params, vary_like

_MIN_BLOCK = 16  # Triton's smallest dot operand
_MIN_TPU_BLOCK = flash_tpu.LANES  # key tiles are lane-dimension blocks on TPU
# GPU: the largest tiles that ptxas compiles without register spills for an H200 (sm_90a)
# in bfloat16, with and without the bias, at NUM_WARPS (bench/gpu_registers.py); key
# tiles of 32 from head_dim 128 (`default_block_sizes`).
DEFAULT_BLOCK_SIZES = {"gpu": BlockSizes(128, 64, 32, 64), "cpu": BlockSizes(32, 32, 32, 32),
                       "tpu": BlockSizes(512, 512, 256, 256)}
NUM_WARPS = 8  # per Triton program, forward and backward


def default_block_sizes(platform: str, head_dim: int) -> BlockSizes:
  """`DEFAULT_BLOCK_SIZES[platform]`, for head_dim > 64 on GPU with key tiles of 32."""
  blocks = DEFAULT_BLOCK_SIZES[platform]
  return dataclasses.replace(blocks, kv=32) if platform == "gpu" and head_dim > 64 else blocks


def supports_head_dim(platform: str, head_dim: int) -> bool:
  """Whether the `platform` kernels take this head_dim (Triton: a power of two >= 16)."""
  return platform != "gpu" or (head_dim >= _MIN_BLOCK and not head_dim & (head_dim - 1))


def _table(table):
  """[heads, num_buckets] float32, buckets padded to a power of two for Triton."""
  return pad(table.astype(jnp.float32), pl.next_power_of_2(table.shape[1]), axis=1)


def _specs(d: int, head=lambda h: h):
  """BlockSpec makers over the grid (tile, batch, head), tiles first (the fastest-varying
  program index on GPU) so the programs reading one head's keys run together: rows of
  [b, L, heads, d] arrays and per-token [b, L] arrays, one tile (`i`) or whole (`0`)."""
  rows = lambda n, whole=False: pl.BlockSpec(
      (SQ, n, SQ, d), lambda i, b, h: (b, 0 if whole else i, head(h), 0))
  tokens = lambda n, whole=False: pl.BlockSpec((SQ, n), lambda i, b, h: (b, 0 if whole else i))
  return rows, tokens


def _forward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, out_dtype=None):
  """(out [b, q_len, heads, d] in out_dtype or q's, lse [b, heads, q_len] float32)."""
  (b, lq, h, d), lk = q.shape, k.shape[1]
  bq, bk = st.blocks.q, st.blocks.kv
  lq_p, lk_p = padded(lq, bq, st.blocks.q_bwd), padded(lk, bk, st.blocks.kv_bwd)
  rows, tokens = _specs(d)
  kv_rows, _ = _specs(d, lambda h: h // st.group)
  qtoks, ktoks = token_arrays(st, q_tok, lq_p), token_arrays(st, kv_tok, lk_p)
  args = [pad(q, lq_p), pad(k, lk_p), pad(v, lk_p), *qtoks, *ktoks]
  specs = ([rows(bq), kv_rows(lk_p, True), kv_rows(lk_p, True)]
           + [tokens(bq)] * len(qtoks) + [tokens(lk_p, True)] * len(ktoks))
  if table is not None:
    args.append(_table(table))
    specs.append(pl.BlockSpec((SQ, args[-1].shape[1]), lambda i, b, h: (h, 0)))
  args = vary_like(args, *args)
  kernel = functools.partial(kernels.forward_kernel, st=st, has_table=table is not None,
                             num_k=lk_p // bk)
  out, lse = pl.pallas_call(
      kernel, grid=(lq_p // bq, b, h), in_specs=specs,
      out_specs=[rows(bq), pl.BlockSpec((SQ, SQ, bq), lambda i, b, h: (b, h, i))],
      out_shape=out_shapes(args, ((b, lq_p, h, d), out_dtype or q.dtype),
                           ((b, h, lq_p), jnp.float32)),
      interpret=st.interpret, compiler_params=triton_params(st.interpret, NUM_WARPS),
      name="flash_attention_forward")(*args)
  return out[:, :lq], lse[:, :, :lq]


def _backward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, lse, delta, dout,
              grad_dtype=None):
  """(dq, dk, dv in grad_dtype or their inputs' dtypes, dtable float32 or None), given
  the forward's lse and delta = sum(out * dout, -1), both [b, heads, q_len]."""
  (b, lq, h, d), (lk, hk), g = q.shape, k.shape[1:3], st.group
  bq, bk = st.blocks.q_bwd, st.blocks.kv_bwd
  lq_p, lk_p = padded(lq, bq, st.blocks.q), padded(lk, bk, st.blocks.kv)
  rows, tokens = _specs(d)
  kv_rows, _ = _specs(d, lambda h: h // g)
  qtoks, ktoks = token_arrays(st, q_tok, lq_p), token_arrays(st, kv_tok, lk_p)
  q, dout, k, v = pad(q, lq_p), pad(dout, lq_p), pad(k, lk_p), pad(v, lk_p)
  lse, delta = pad(lse, lq_p, axis=2), pad(delta, lq_p, axis=2)
  table = [] if table is None else [_table(table)]
  args = [q, k, v, dout, lse, delta, *qtoks, *ktoks, *table]
  args = vary_like(args, *args)
  has_table, params = bool(table), triton_params(st.interpret, NUM_WARPS)
  dtype = lambda x: grad_dtype or x.dtype

  # dK, dV: grid over key/value heads; each reads the queries of its whole group.
  group_rows = pl.BlockSpec((SQ, lq_p, g, d), lambda j, b, h: (b, 0, h, 0))
  group_stats = pl.BlockSpec((SQ, g, lq_p), lambda j, b, h: (b, h, 0))
  specs = ([group_rows, rows(bk), rows(bk), group_rows, group_stats, group_stats]
           + [tokens(lq_p, True)] * len(qtoks) + [tokens(bk)] * len(ktoks))
  if has_table:
    specs.append(pl.BlockSpec((g, table[0].shape[1]), lambda j, b, h: (h, 0)))
  dk, dv = pl.pallas_call(
      functools.partial(kernels.dkdv_kernel, st=st, has_table=has_table, num_q=lq_p // bq),
      grid=(lk_p // bk, b, hk), in_specs=specs, out_specs=[rows(bk), rows(bk)],
      out_shape=out_shapes(args, ((b, lk_p, hk, d), dtype(k)), ((b, lk_p, hk, d), dtype(v))),
      interpret=st.interpret, compiler_params=params, name="flash_attention_dkdv")(*args)

  stats = pl.BlockSpec((SQ, SQ, bq), lambda i, b, h: (b, h, i))
  specs = ([rows(bq), kv_rows(lk_p, True), kv_rows(lk_p, True), rows(bq), stats, stats]
           + [tokens(bq)] * len(qtoks) + [tokens(lk_p, True)] * len(ktoks))
  out_specs, out_shape = [rows(bq)], [((b, lq_p, h, d), dtype(q))]
  if has_table:
    nb = table[0].shape[1]
    specs.append(pl.BlockSpec((SQ, nb), lambda i, b, h: (h, 0)))
    out_specs.append(pl.BlockSpec((SQ, SQ, SQ, nb), lambda i, b, h: (b, h, i, 0)))
    out_shape.append(((b, h, lq_p // bq, nb), jnp.float32))
  dq, *dtable = pl.pallas_call(
      functools.partial(kernels.dq_kernel, st=st, has_table=has_table, num_k=lk_p // bk),
      grid=(lq_p // bq, b, h), in_specs=specs, out_specs=out_specs,
      out_shape=out_shapes(args, *out_shape), interpret=st.interpret,
      compiler_params=params, name="flash_attention_dq")(*args)
  dtable = dtable[0].sum(axis=(0, 2)) if has_table else None
  return dq[:, :lq], dk[:, :lk], dv[:, :lk], dtable


def _kernels(st: kernels.Config):
  """(forward, backward) of the configuration's kernel family."""
  return (flash_tpu.forward, flash_tpu.backward) if st.platform == "tpu" else (
      _forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: kernels.Config, q, k, v, q_tok, kv_tok, table):
  return _kernels(st)[0](st, q, k, v, q_tok, kv_tok, table)


def _flash_forward(st, q, k, v, q_tok, kv_tok, table):
  out, lse = _kernels(st)[0](st, q, k, v, q_tok, kv_tok, table)
  return (out, lse), (q, k, v, q_tok, kv_tok, table, out, lse)


def _flash_backward(st, residuals, cotangents):
  q, k, v, q_tok, kv_tok, table, out, lse = residuals
  dout, dlse = cotangents
  # d lse / d logits = P, so a log-sum-exp cotangent enters as dS = P (dP - delta + dlse).
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  dq, dk, dv, dtable = _kernels(st)[1](st, q, k, v, q_tok, kv_tok, table, lse, delta - dlse,
                                       dout)
  dq, dk, dv, dtable = (sum_unvarying(g, x) for g, x in ((dq, q), (dk, k), (dv, v),
                                                         (dtable, table)))
  if dtable is not None:
    dtable = dtable[:, :table.shape[1]].astype(table.dtype)
  return dq, dk, dv, None, None, dtable


_flash.defvjp(_flash_forward, _flash_backward)


def _static(q, k, v, *, causal, q_prefix, kv_prefix, bias_table, bucket_fn, scale,
            block_sizes, interpret, platform) -> kernels.Config:
  """Checks the inputs; the kernels' static configuration."""
  if not q.ndim == k.ndim == v.ndim == 4 or k.shape != v.shape:
    raise ValueError(f"flash_attention takes q [batch, q_len, heads, head_dim] and k, v of "
                     f"one shape [batch, kv_len, kv_heads, head_dim]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}.")
  (b, lq, h, d), (kb, lk, hk, kd) = q.shape, k.shape
  if kd != d or kb != b:
    raise ValueError(f"flash_attention needs q and k/v with the same batch and head_dim; "
                     f"got q {q.shape} and k/v {k.shape}.")
  if h % hk:
    raise ValueError(f"flash_attention groups query heads over key/value heads: {h} query "
                     f"heads is not a multiple of {hk} key/value heads.")
  if (bias_table is None) != (bucket_fn is None):
    raise ValueError("flash_attention takes a relative bias as bias_table and bucket_fn "
                     "together (or neither).")
  if bias_table is not None and (bias_table.ndim != 2 or bias_table.shape[0] != h):
    raise ValueError(f"bias_table must be [heads={h}, num_buckets]; got {bias_table.shape}.")
  if causal and (q_prefix is None) != (kv_prefix is None):
    raise ValueError("prefix-LM attention needs both q_prefix and kv_prefix (or neither).")
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend not in ("gpu", "tpu")
  platform = platform or ("tpu" if backend == "tpu" else "gpu")
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"flash_attention has kernels for platform 'gpu' (Triton) and 'tpu' "
                     f"(Mosaic); got platform={platform!r}.")
  if not supports_head_dim(platform, d):
    raise ValueError(f"flash_attention on GPU needs a power-of-two head_dim >= {_MIN_BLOCK}; "
                     f"got {d}.")
  blocks = block_sizes or default_block_sizes(
      "cpu" if interpret and platform == "gpu" else platform, d)
  smallest = _MIN_TPU_BLOCK if platform == "tpu" else _MIN_BLOCK
  if any(n < smallest or n & (n - 1) for n in dataclasses.astuple(blocks)):
    raise ValueError(f"flash_attention's {platform!r} block sizes must be powers of two "
                     f">= {smallest}; got {blocks}.")
  blocks = BlockSizes(fit(blocks.q, lq, smallest), fit(blocks.kv, lk, smallest),
                      fit(blocks.q_bwd, lq, smallest), fit(blocks.kv_bwd, lk, smallest))
  return kernels.Config(bool(causal), bool(causal) and q_prefix is not None, float(scale),
                        bucket_fn, h // hk, blocks, bool(interpret), platform)


def flash_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                    causal: bool = False, q_prefix=None, kv_prefix=None, bias_table=None,
                    bucket_fn: Callable | None = None, scale: float = 1.0,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                    platform: str | None = None, return_lse: bool = False):
  """Attention of q over k, v, differentiable in q, k, v and bias_table.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  segment ids (0 = padding), positions, prefix flags (prefix-LM, used if causal):
  int [batch, len]. bias_table: [heads, num_buckets] with `bucket_fn`, a hashable
  function of int relative positions (key - query) to buckets in [0, num_buckets),
  e.g. model/position.py's `relative_position_bucket` with its settings bound.
  block_sizes: None for the platform's `default_block_sizes`; interpret: None for
  interpret mode off GPU and TPU; platform: the kernels, 'gpu' (Triton) or 'tpu'
  (Mosaic), None for this backend's (the GPU kernels on CPU). Returns out [batch,
  q_len, heads, head_dim] in q's dtype, and with `return_lse` also the log-sum-exp of
  the logits [batch, heads, q_len] float32 (-inf, with out 0, for queries that see no
  key).
  """
  st = _static(q, k, v, causal=causal, q_prefix=q_prefix, kv_prefix=kv_prefix,
               bias_table=bias_table, bucket_fn=bucket_fn, scale=scale,
               block_sizes=block_sizes, interpret=interpret, platform=platform)
  q_tok = Tokens(q_segment_ids, q_positions, q_prefix if st.prefix else None)
  kv_tok = Tokens(kv_segment_ids, kv_positions, kv_prefix if st.prefix else None)
  for what, tok, x in (("q", q_tok, q), ("kv", kv_tok, k)):
    shapes = [t.shape for t in tok if t is not None]
    if any(shape != x.shape[:2] for shape in shapes):
      raise ValueError(f"flash_attention's {what} segment ids, positions and prefix must be "
                       f"[batch, length] = {x.shape[:2]}; got {shapes}.")
  out, lse = _flash(st, q, k, v, q_tok, kv_tok, bias_table)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class FlashBlockAttention:
  """The flash kernels as the `BlockAttentionFn` of kernels/ring_attention.py: each
  key/value tile of a ring step is one call of the forward (merged into the running
  (out, lse) by log-sum-exp weights) or backward kernels. `bucket_fn`: the bucket
  function of the ring's `PositionBias`, whose params are the [heads, num_buckets]
  table (None without a bias)."""

  block_size: int = 512
  bucket_fn: Callable | None = None
  block_sizes: BlockSizes | None = None
  interpret: bool | None = None
  platform: str | None = None

  def _static(self, q, k, q_tok, kv_tok, bias, causal, scale):
    return _static(q, k, k, causal=causal, q_prefix=q_tok.prefix, kv_prefix=kv_tok.prefix,
                   bias_table=None if bias is None else bias.params,
                   bucket_fn=None if bias is None else self.bucket_fn, scale=scale,
                   block_sizes=self.block_sizes, interpret=self.interpret,
                   platform=self.platform)

  def forward(self, q, k, v, q_tok, kv_tok, bias, acc, *, causal, scale):
    st = self._static(q, k, q_tok, kv_tok, bias, causal, scale)
    out, lse = _kernels(st)[0](st, q, k, v, q_tok, kv_tok,
                               None if bias is None else bias.params, jnp.float32)
    acc_out, acc_lse = acc
    total = jnp.logaddexp(acc_lse, lse)
    safe = jnp.where(total == -jnp.inf, 0.0, total)
    weight = lambda lse: jnp.swapaxes(jnp.exp(lse - safe), 1, 2)[..., None]
    return acc_out * weight(acc_lse) + out * weight(lse), total

  def backward(self, q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal,
               scale):
    st = self._static(q, k, q_tok, kv_tok, bias, causal, scale)
    table = None if bias is None else bias.params
    dq, dk, dv, dtable = _kernels(st)[1](st, q, k, v, q_tok, kv_tok, table, lse, delta,
                                         dout, jnp.float32)
    if dtable is not None:
      dtable = dtable[:, :table.shape[1]]
    return jax.tree.map(jnp.add, grads, (dq, dk, dv, dtable))
