"""Flash attention for TPU (Mosaic): the kernels of kernels/flash_attention.py laid out
for Mosaic's (8, 128) tiling. flash_attention.py checks the inputs and picks these
kernels on TPU (or with `platform='tpu'`, in interpret mode on CPU for the tests).

Layout: q, k, v heads-major, [batch, heads, length, head_dim]; per-token arrays of
queries as columns [batch, length, 1] and of keys as rows [batch, 1, length], so a
tile's mask is a broadcast of the two. The grid streams key tiles (forward, dQ) or
query tiles (dK/dV) as its last, sequential dimension, with the running statistics
and accumulators in VMEM scratch. Which (query tile, key tile) pairs can see each
other is decided outside the kernel from per-tile bounds (`flash_kernels.may_see`)
and prefetched into SMEM with the tile each grid step fetches (`_plan`): invisible
pairs are skipped, and their blocks are not copied. The relative-bias table sits
in SMEM and is read per bucket: a tile adds `table[h, b]` where its buckets equal b,
for the buckets between the tile's smallest and largest, and the backward sums dS
per bucket the same way.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ul2x.kernels import flash_kernels as kernels
from ul2x.kernels.attention_inputs import Tokens, visible
from ul2x.kernels.ring_attention import vary_like

LANES = 128  # key tiles and the bias-gradient row are multiples of the vector width
# Grid indices are int32 scalars: lax.div / lax.rem (nonnegative operands) rather than
# // and %, whose floor semantics lower through `sign`, which Mosaic lowers per chip.


def _logits(st: kernels.Config, q, k, qt: Tokens, kt: Tokens, table_ref, head):
  """Masked float32 logits [bq, bk] and their buckets (None without a bias)."""
  s = kernels.dot(q, k)
  if st.scale != 1.0:
    s = s * st.scale
  buckets = None
  if table_ref is not None:
    buckets = st.bucket_fn(kt.positions - qt.positions).astype(jnp.int32)

    def add(b, bias):
      return jnp.where(buckets == b, table_ref[head, b], bias)

    s = s + lax.fori_loop(jnp.min(buckets), jnp.max(buckets) + 1, add, jnp.zeros_like(s))
  return jnp.where(visible(qt, kt, st.causal, outer=False), s, -jnp.inf), buckets


def _bucket_sums(ds, buckets, sums):
  """sums [1, nb] + per-bucket sums of ds over the buckets the tile holds."""
  lanes = lax.broadcasted_iota(jnp.int32, sums.shape, 1)

  def add(b, sums):
    total = jnp.sum(jnp.sum(jnp.where(buckets == b, ds, 0.0), axis=1, keepdims=True),
                    axis=0, keepdims=True)
    return sums + jnp.where(lanes == b, total, 0.0)

  return lax.fori_loop(jnp.min(buckets), jnp.max(buckets) + 1, add, sums)


def _visible(plan_ref, b, i, j):
  return lax.rem(plan_ref[b, i, j], 2) != 0


def _whole_tokens(qtok, ktok):
  return kernels.read_tokens(qtok, slice(None)), kernels.read_tokens(ktok, slice(None))


def _forward_kernel(plan_ref, *refs, st, has_table, num_k):
  (q_ref, k_ref, v_ref), qtok, ktok, table_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = (
      kernels.split_refs(st, refs, 3, has_table))
  b, h, i, j = (pl.program_id(n) for n in range(4))

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_visible(plan_ref, b, i, j))
  def _():
    v = v_ref[...]
    s, _ = _logits(st, q_ref[...], k_ref[...], *_whole_tokens(qtok, ktok), table_ref, h)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    correction = jnp.exp(m - m_safe)
    l_sc[...] = l_sc[...] * correction + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * correction + kernels.dot(p.astype(v.dtype), v, (1, 0))
    m_sc[...] = m_new

  @pl.when(j == num_k - 1)
  def _():
    l = l_sc[...]
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l), -jnp.inf)


def _probabilities(s, lse):
  return jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))


def _dkdv_kernel(plan_ref, *refs, st, has_table, num_q):
  """One key/value tile of one key/value head; the last grid dimension runs over the
  query tiles of every query head of its group."""
  inputs, qtok, ktok, table_ref, rest = kernels.split_refs(st, refs, 6, has_table)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  b, hk, j, t = (pl.program_id(n) for n in range(4))

  @pl.when(t == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_visible(plan_ref, b, lax.rem(t, num_q), j))
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, _ = _logits(st, q, k, *_whole_tokens(qtok, ktok), table_ref,
                   hk * st.group + lax.div(t, num_q))
    p = _probabilities(s, lse_ref[...])
    ds = p * (kernels.dot(do, v) - delta_ref[...])
    if st.scale != 1.0:
      ds = ds * st.scale
    dv_sc[...] += kernels.dot(p.astype(do.dtype), do, (0, 0))
    dk_sc[...] += kernels.dot(ds.astype(q.dtype), q, (0, 0))

  @pl.when(t == st.group * num_q - 1)
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(plan_ref, *refs, st, has_table, num_k):
  """One query tile of one head against the key tiles of the last grid dimension; with
  a bias also the tile's per-bucket sums of dS (the bias table's gradient)."""
  inputs, qtok, ktok, table_ref, rest = kernels.split_refs(st, refs, 6, has_table)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dq_ref, dtable_ref, dq_sc, dtable_sc = rest if has_table else (rest[0], None, rest[1], None)
  b, h, i, j = (pl.program_id(n) for n in range(4))

  @pl.when(j == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    if has_table:
      dtable_sc[...] = jnp.zeros(dtable_sc.shape, jnp.float32)

  @pl.when(_visible(plan_ref, b, i, j))
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, buckets = _logits(st, q, k, *_whole_tokens(qtok, ktok), table_ref, h)
    ds = _probabilities(s, lse_ref[...]) * (kernels.dot(do, v) - delta_ref[...])
    if has_table:
      dtable_sc[...] = _bucket_sums(ds, buckets, dtable_sc[...])
    if st.scale != 1.0:
      ds = ds * st.scale
    dq_sc[...] += kernels.dot(ds.astype(k.dtype), k, (1, 0))

  @pl.when(j == num_k - 1)
  def _():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
    if has_table:
      dtable_ref[...] = dtable_sc[...]


def _plan(st, q_tok: Tokens, kv_tok: Tokens, bq: int, bk: int, streamed: int):
  """int32 [batch, q tiles, kv tiles], prefetched into SMEM: 2 x the tile to fetch along
  the `streamed` axis (2: key tiles, 1: query tiles) + 1 where some query of the q tile
  may see some key of the kv tile. A skipped tile fetches the last visible one before
  it (or the first after), so its block index repeats and the pipeline copies nothing."""
  tiles = lambda tok, n: Tokens(*(None if x is None else x.reshape(x.shape[0], -1, n)
                                  for x in tok))
  may_see = functools.partial(kernels.may_see, causal=st.causal)
  per_pair = jax.vmap(jax.vmap(may_see, (None, 0)), (0, None))  # over q tiles, kv tiles
  see = jax.vmap(per_pair)(tiles(q_tok, bq), tiles(kv_tok, bk))
  index = lax.broadcasted_iota(jnp.int32, see.shape, streamed)
  last = lax.cummax(jnp.where(see, index, -1), axis=streamed)
  first = jnp.argmax(see, axis=streamed, keepdims=True).astype(jnp.int32)
  return 2 * jnp.where(last >= 0, last, first) + see.astype(jnp.int32)


def _fetch(plan, b, i, j):
  """The streamed tile to fetch at grid step (b, i, j), from the plan."""
  return lax.div(plan[b, i, j], 2)


def _prepare(st, q_tok, kv_tok, lq_p, lk_p):
  """Padded Tokens of q and kv, and the kernels' per-token inputs: query columns
  [b, L, 1] and key rows [b, 1, L]."""
  qt = Tokens(*kernels.token_arrays(st, q_tok, lq_p), *([None] * (1 - st.prefix)))
  kt = Tokens(*kernels.token_arrays(st, kv_tok, lk_p), *([None] * (1 - st.prefix)))
  n_tok = 3 if st.prefix else 2
  cols = [x[:, :, None] for x in qt[:n_tok]]
  rows = [x[:, None, :] for x in kt[:n_tok]]
  return qt, kt, cols, rows


def _params(st, *semantics):
  return None if st.interpret else pltpu.CompilerParams(dimension_semantics=semantics)


def forward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, out_dtype=None):
  """(out [b, q_len, heads, d] in out_dtype or q's, lse [b, heads, q_len] float32)."""
  (b, lq, h, d), lk = q.shape, k.shape[1]
  bq, bk, g = st.blocks.q, st.blocks.kv, st.group
  lq_p = kernels.padded(lq, bq, st.blocks.q_bwd)
  lk_p = kernels.padded(lk, bk, st.blocks.kv_bwd)
  qt, kt, cols, rows = _prepare(st, q_tok, kv_tok, lq_p, lk_p)
  heads_major = lambda x, n: kernels.pad(jnp.swapaxes(x, 1, 2), n, axis=2)
  args = [heads_major(q, lq_p), heads_major(k, lk_p), heads_major(v, lk_p), *cols, *rows]
  sq = kernels.SQ
  kv_rows = pl.BlockSpec((sq, sq, bk, d),
                         lambda b, h, i, j, p: (b, lax.div(h, g), _fetch(p, b, i, j), 0))
  specs = ([pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0)), kv_rows, kv_rows]
           + [pl.BlockSpec((sq, bq, 1), lambda b, h, i, j, p: (b, i, 0))] * len(cols)
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, i, j, p: (b, 0, _fetch(p, b, i, j)))]
           * len(rows))
  if table is not None:
    args.append(table.astype(jnp.float32))
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  plan = _plan(st, qt, kt, bq, bk, streamed=2)
  args = vary_like([plan, *args], plan, *args)
  kernel = functools.partial(_forward_kernel, st=st,
                             has_table=table is not None, num_k=lk_p // bk)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, h, lq_p // bq, lk_p // bk), in_specs=specs,
      out_specs=[pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0)),
                 pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i, j, p: (b, h, i, 0))],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=kernels.out_shapes(args, ((b, h, lq_p, d), out_dtype or q.dtype),
                                   ((b, h, lq_p, 1), jnp.float32)),
      compiler_params=_params(st, "parallel", "parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="flash_attention_forward_tpu")(*args)
  return jnp.swapaxes(out[:, :, :lq], 1, 2), lse[:, :, :lq, 0]


def backward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, lse, delta, dout,
             grad_dtype=None):
  """(dq, dk, dv in grad_dtype or their inputs' dtypes, dtable float32 or None), given
  the forward's lse and delta = sum(out * dout, -1), both [b, heads, q_len]."""
  (b, lq, h, d), (lk, hk), g = q.shape, k.shape[1:3], st.group
  bq, bk = st.blocks.q_bwd, st.blocks.kv_bwd
  lq_p, lk_p = kernels.padded(lq, bq, st.blocks.q), kernels.padded(lk, bk, st.blocks.kv)
  nq, nk = lq_p // bq, lk_p // bk
  qt, kt, cols, rows = _prepare(st, q_tok, kv_tok, lq_p, lk_p)
  heads_major = lambda x, n: kernels.pad(jnp.swapaxes(x, 1, 2), n, axis=2)
  stat = lambda x: kernels.pad(x, lq_p, axis=2)[..., None]
  args = [heads_major(q, lq_p), heads_major(k, lk_p), heads_major(v, lk_p),
          heads_major(dout, lq_p), stat(lse), stat(delta), *cols, *rows]
  has_table = table is not None
  if has_table:
    args.append(table.astype(jnp.float32))
  q_plan, kv_plan = (_plan(st, qt, kt, bq, bk, streamed) for streamed in (1, 2))
  q_plan, kv_plan, *args = vary_like([q_plan, kv_plan, *args], q_plan, *args)
  dtype = lambda x: grad_dtype or x.dtype
  sq, smem = kernels.SQ, [pl.BlockSpec(memory_space=pltpu.SMEM)] * has_table
  n_tok = len(cols)

  # dK, dV: grid (batch, kv head, kv tile, query tile of each head of the group).
  q_tile = lambda p, b, j, t: _fetch(p, b, lax.rem(t, nq), j)
  q_block = lambda b, h, j, t, p: (b, h * g + lax.div(t, nq), q_tile(p, b, j, t), 0)
  q_rows, q_stat = (pl.BlockSpec((sq, sq, bq, n), q_block) for n in (d, 1))
  kv_rows = pl.BlockSpec((sq, sq, bk, d), lambda b, h, j, t, p: (b, h, j, 0))
  specs = ([q_rows, kv_rows, kv_rows, q_rows, q_stat, q_stat]
           + [pl.BlockSpec((sq, bq, 1), lambda b, h, j, t, p: (b, q_tile(p, b, j, t), 0))]
           * n_tok
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, j, t, p: (b, 0, j))] * n_tok + smem)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, st=st, has_table=has_table, num_q=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, hk, nk, g * nq), in_specs=specs,
          out_specs=[kv_rows, kv_rows],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
      out_shape=kernels.out_shapes(args, ((b, hk, lk_p, d), dtype(k)),
                                   ((b, hk, lk_p, d), dtype(v))),
      compiler_params=_params(st, "parallel", "parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="flash_attention_dkdv_tpu")(q_plan, *args)

  # dQ (and the bias table's gradient per query tile): grid (batch, head, q tile, kv tile).
  q_rows = pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0))
  q_stat = pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i, j, p: (b, h, i, 0))
  kv_rows = pl.BlockSpec((sq, sq, bk, d),
                         lambda b, h, i, j, p: (b, lax.div(h, g), _fetch(p, b, i, j), 0))
  specs = ([q_rows, kv_rows, kv_rows, q_rows, q_stat, q_stat]
           + [pl.BlockSpec((sq, bq, 1), lambda b, h, i, j, p: (b, i, 0))] * n_tok
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, i, j, p: (b, 0, _fetch(p, b, i, j)))]
           * n_tok + smem)
  out_specs, out_shape, scratch = [q_rows], [((b, h, lq_p, d), dtype(q))], [
      pltpu.VMEM((bq, d), jnp.float32)]
  if has_table:
    nb = -(-table.shape[1] // LANES) * LANES
    out_specs.append(pl.BlockSpec((sq, sq, sq, 1, nb), lambda b, h, i, j, p: (b, h, i, 0, 0)))
    out_shape.append(((b, h, nq, 1, nb), jnp.float32))
    scratch.append(pltpu.VMEM((1, nb), jnp.float32))
  dq, *dtable = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, has_table=has_table, num_k=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=kernels.out_shapes(args, *out_shape),
      compiler_params=_params(st, "parallel", "parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="flash_attention_dq_tpu")(kv_plan, *args)
  dtable = dtable[0].sum(axis=(0, 2, 3)) if has_table else None
  unmajor = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)
  return unmajor(dq, lq), unmajor(dk, lk), unmajor(dv, lk), dtable
