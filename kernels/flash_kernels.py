"""The GPU (Triton) kernel bodies of flash attention (kernels/flash_attention.py calls
them): one program's loop over tiles, online softmax forward, dK/dV and dQ backward,
with the mask of kernels/attention_inputs.py's `visible` and the bucketed relative
bias computed per tile. Written with operations that lower on Triton and in the
interpreter: 2-D dots, elementwise math, reductions, `fori_loop` and `cond`. Also
what both kernel families share (the TPU kernels are in kernels/flash_tpu.py): the
static `Config` and `BlockSizes`, padding and per-token inputs, the per-tile
visibility bound `may_see`, and the kernels' ref layout. Tile arithmetic, dots and
output shapes are kernels/utils.py's."""

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ul2x.kernels.attention_inputs import Tokens, visible
from ul2x.kernels.utils import dot


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per tile: queries and keys of the forward kernel and of both backward
  kernels (dK/dV and dQ). Powers of two; shrunk to fit short sequences."""

  q: int = 128
  kv: int = 64
  q_bwd: int = 64
  kv_bwd: int = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """What the kernels are specialised on (hashable)."""

  causal: bool
  prefix: bool
  scale: float
  bucket_fn: Callable | None
  group: int  # query heads per key/value head
  blocks: BlockSizes
  interpret: bool
  platform: str  # the kernel family: 'gpu' (Triton) or 'tpu' (Mosaic)


SQ = getattr(pl, "squeezed", None)  # a block dimension dropped in the kernel (None before)


def pad(x, length: int, axis: int = 1):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def token_arrays(st: Config, tok: Tokens, length: int):
  """The kernels' per-token inputs, int32 [batch, length]; padding gets segment 0."""
  arrays = tok[:3] if st.prefix else tok[:2]
  return [pad(x.astype(jnp.int32), length) for x in arrays]


def read_tokens(refs, index) -> Tokens:
  return Tokens(*(r[index] for r in refs), *([None] * (3 - len(refs))))


def may_see(qt: Tokens, kt: Tokens, causal: bool):
  """`visible` bounded over a whole tile from per-token minima and maxima, cheap
  enough to decide whether to skip the tile. False only if no query of the tile can
  see any key: disjoint segment ranges, keys all padding, or (causal) every real key
  after every real query outside the prefix. Padding (segment 0) is left out of the
  position bounds."""
  smin = lambda x: jnp.min(x.astype(jnp.int32))
  smax = lambda x: jnp.max(x.astype(jnp.int32))
  out = ((smin(qt.segment_ids) <= smax(kt.segment_ids))
         & (smin(kt.segment_ids) <= smax(qt.segment_ids)) & (smax(kt.segment_ids) > 0))
  if causal:
    big = jnp.iinfo(jnp.int32).max
    order = (smin(jnp.where(kt.segment_ids != 0, kt.positions, big))
             <= smax(jnp.where(qt.segment_ids != 0, qt.positions, -big)))
    if qt.prefix is not None:
      order = order | ((smax(qt.prefix != 0) > 0) & (smax(kt.prefix != 0) > 0))
    out = out & order
  return out


def _logits(st: Config, q, k, qt: Tokens, kt: Tokens, table_lookup):
  """Masked float32 logits [q, k] (-inf where not visible) and the bias buckets."""
  s = dot(q, k)
  if st.scale != 1.0:
    s = s * st.scale
  buckets = None
  if table_lookup is not None:
    buckets = st.bucket_fn(kt.positions[None, :] - qt.positions[:, None]).astype(jnp.int32)
    s = s + table_lookup(buckets)
  return jnp.where(visible(qt, kt, st.causal), s, -jnp.inf), buckets


def _probabilities(s, lse):
  return jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse)[:, None])


def split_refs(st: Config, refs, n_fixed: int, has_table: bool):
  """(first n_fixed refs, q tokens, kv tokens, table or None, outputs)."""
  n_tok = 3 if st.prefix else 2
  fixed, rest = refs[:n_fixed], refs[n_fixed:]
  qtok, ktok, rest = rest[:n_tok], rest[n_tok:2 * n_tok], rest[2 * n_tok:]
  table, outs = (rest[0], rest[1:]) if has_table else (None, rest)
  return fixed, qtok, ktok, table, outs


def forward_kernel(*refs, st: Config, has_table: bool, num_k: int):
  (q_ref, k_ref, v_ref), qtok, ktok, table_ref, (o_ref, lse_ref) = split_refs(
      st, refs, 3, has_table)
  bq, bk = q_ref.shape[0], st.blocks.kv
  q, qt = q_ref[...], read_tokens(qtok, slice(None))
  lookup = None if table_ref is None else (lambda b: table_ref[b])

  def tile(j, carry):
    kt = read_tokens(ktok, pl.ds(j * bk, bk))

    def attend(carry):
      o, m, l = carry
      v = v_ref[pl.ds(j * bk, bk), :]
      s, _ = _logits(st, q, k_ref[pl.ds(j * bk, bk), :], qt, kt, lookup)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[:, None])
      correction = jnp.exp(m - m_safe)
      o = o * correction[:, None] + dot(p.astype(v.dtype), v, (1, 0))
      return o, m_new, l * correction + jnp.sum(p, axis=1)

    return lax.cond(may_see(qt, kt, st.causal), attend, lambda c: c, carry)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  o, m, l = lax.fori_loop(0, num_k, tile, init)
  seen = l > 0.0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -jnp.inf)


def dkdv_kernel(*refs, st: Config, has_table: bool, num_q: int):
  """One key/value tile of one key/value head against every query of its group."""
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qtok, ktok, table_ref, (dk_ref, dv_ref) = (
      split_refs(st, refs, 6, has_table))
  bq = st.blocks.q_bwd
  k, v, kt = k_ref[...], v_ref[...], read_tokens(ktok, slice(None))

  def q_tile(i, carry, g):
    qt = read_tokens(qtok, pl.ds(i * bq, bq))

    def grads(carry):
      dk, dv = carry
      rows = pl.ds(i * bq, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      lookup = None if table_ref is None else (lambda b: table_ref[g, b])
      s, _ = _logits(st, q, k, qt, kt, lookup)
      p = _probabilities(s, lse_ref[g, rows])
      ds = p * (dot(do, v) - delta_ref[g, rows][:, None])
      if st.scale != 1.0:
        ds = ds * st.scale
      return dk + dot(ds.astype(q.dtype), q, (0, 0)), dv + dot(p.astype(do.dtype), do, (0, 0))

    return lax.cond(may_see(qt, kt, st.causal), grads, lambda c: c, carry)

  head = lambda g, carry: lax.fori_loop(0, num_q, functools.partial(q_tile, g=g), carry)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, st.group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_kernel(*refs, st: Config, has_table: bool, num_k: int):
  """One query tile of one head against every key; with a bias also the tile's
  per-bucket sums of dS (the gradient of the bias table)."""
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qtok, ktok, table_ref, outs = split_refs(
      st, refs, 6, has_table)
  bk = st.blocks.kv_bwd
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qt = read_tokens(qtok, slice(None))
  lookup = None if table_ref is None else (lambda b: table_ref[b])

  def tile(j, carry):
    kt = read_tokens(ktok, pl.ds(j * bk, bk))

    def grads(carry):
      dq, dtable = carry
      k, v = k_ref[pl.ds(j * bk, bk), :], v_ref[pl.ds(j * bk, bk), :]
      s, buckets = _logits(st, q, k, qt, kt, lookup)
      ds = _probabilities(s, lse) * (dot(do, v) - delta[:, None])
      if dtable is not None:
        dtable = _bucket_sums(ds, buckets, dtable)
      if st.scale != 1.0:
        ds = ds * st.scale
      return dq + dot(ds.astype(k.dtype), k, (1, 0)), dtable

    return lax.cond(may_see(qt, kt, st.causal), grads, lambda c: c, carry)

  dtable = None if table_ref is None else jnp.zeros(table_ref.shape, jnp.float32)
  dq, dtable = lax.fori_loop(0, num_k, tile, (jnp.zeros(q.shape, jnp.float32), dtable))
  outs[0][...] = dq.astype(outs[0].dtype)
  if dtable is not None:
    outs[1][...] = dtable


def _bucket_sums(ds, buckets, sums):
  """sums[b] += sum of ds where buckets == b, one masked reduction per bucket that
  occurs in the tile (log-spaced buckets: a few, away from the diagonal)."""
  ids = lax.broadcasted_iota(jnp.int32, sums.shape, 0)

  def add(b, sums):
    total = jnp.sum(jnp.sum(jnp.where(buckets == b, ds, 0.0), axis=1), axis=0)
    return sums + jnp.where(ids == b, total, 0.0)

  return lax.fori_loop(jnp.min(buckets), jnp.max(buckets) + 1, add, sums)
