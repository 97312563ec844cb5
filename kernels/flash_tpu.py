"""Flash attention for TPU (Mosaic): the kernels of kernels/flash_attention.py laid out
for Mosaic's (8, 128) tiling. flash_attention.py checks the inputs and picks these
kernels on TPU (or with `platform='tpu'`, in interpret mode on CPU for the tests).

Layout: q, k, v heads-major, [batch, heads, length, head_dim]. Everything per token
(segment ids, positions, prefix flags, log-sum-exp, delta) is a lane-dense row
[.., 1, length] in memory: a [.., length, 1] column would be padded to 128 lanes, 128
times its size. In the kernel a query tile's rows are turned into columns [bq, 1]
(`_column`) so that they broadcast against a key tile's rows [1, bk] into the tile's
mask. The grid streams key tiles (forward, dQ) or query tiles (dK/dV) as its last,
sequential dimension, with the running statistics and accumulators in VMEM scratch.
Which (query tile, key tile) pairs can see each other is decided outside the kernel
from per-tile bounds (`flash_kernels.may_see`) and prefetched into SMEM with the tile
each grid step fetches (`_plan`): invisible pairs are skipped, and their blocks are not
copied. The relative-bias table sits in SMEM and is read per bucket: a tile adds
`table[h, b]` where its buckets equal b, for the buckets its visible pairs hold, and
the backward sums dS per bucket the same way.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ul2x.kernels import flash_kernels as kernels
from ul2x.kernels.attention_inputs import Tokens, visible
from ul2x.kernels.utils import dot, out_shapes, padded, vary_like

LANES = 128  # key tiles and the bias-gradient row are multiples of the vector width
SUBLANES = 8
PLAN_BYTES = 256 * 1024  # most SMEM for one call's tile plan (of about 1 MiB in all)
# Grid indices are int32 scalars: lax.div / lax.rem (nonnegative operands) rather than
# // and %, whose floor semantics lower through `sign`, which Mosaic lowers per chip.


def _column(row):
  """[1, n] -> [n, 1], through a 2-D transpose Mosaic supports."""
  return jnp.transpose(jnp.broadcast_to(row, (SUBLANES, row.shape[1])))[:, :1]


def _row(column):
  """[n, 1] -> [1, n]."""
  return jnp.transpose(jnp.broadcast_to(column, (column.shape[0], LANES)))[:1, :]


def _tile_tokens(qtok, ktok) -> tuple[Tokens, Tokens]:
  """The tile's query tokens as columns [bq, 1] and key tokens as rows [1, bk]."""
  return Tokens(*(_column(r[...]) for r in qtok)), Tokens(*(r[...] for r in ktok))


def _logits(st: kernels.Config, q, k, qtok, ktok, table_ref, head):
  """Masked float32 logits [bq, bk]; with a bias also its buckets and the range of
  buckets that visible pairs hold (lo, hi), else (None, None)."""
  qt, kt = _tile_tokens(qtok, ktok)
  mask = visible(qt, kt, st.causal, outer=False)
  s = dot(q, k)
  if st.scale != 1.0:
    s = s * st.scale
  buckets = span = None
  if table_ref is not None:
    buckets = st.bucket_fn(kt.positions - qt.positions).astype(jnp.int32)
    span = (jnp.min(jnp.where(mask, buckets, jnp.iinfo(jnp.int32).max)),
            jnp.max(jnp.where(mask, buckets, -1)))

    def add(b, bias):
      return jnp.where(buckets == b, table_ref[head, b], bias)

    s = s + lax.fori_loop(span[0], span[1] + 1, add, jnp.zeros_like(s))
  return jnp.where(mask, s, -jnp.inf), buckets, span


def _bucket_sums(ds, buckets, span, sums):
  """sums [1, nb] + per-bucket sums of ds over the buckets in `span`."""
  lanes = lax.broadcasted_iota(jnp.int32, sums.shape, 1)

  def add(b, sums):
    total = jnp.sum(jnp.sum(jnp.where(buckets == b, ds, 0.0), axis=1, keepdims=True),
                    axis=0, keepdims=True)
    return sums + jnp.where(lanes == b, total, 0.0)

  return lax.fori_loop(span[0], span[1] + 1, add, sums)


def _probabilities(s, lse_row):
  lse = _column(lse_row)
  return jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))


def _forward_kernel(plan_ref, *refs, st, has_table, grid):
  (q_ref, k_ref, v_ref), qtok, ktok, table_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = (
      kernels.split_refs(st, refs, 3, has_table))
  b, h, i, j = (pl.program_id(n) for n in range(4))

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_visible(plan_ref, grid, b, i, j))
  def _():
    v = v_ref[...]
    s, _, _ = _logits(st, q_ref[...], k_ref[...], qtok, ktok, table_ref, h)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    correction = jnp.exp(m - m_safe)
    l_sc[...] = l_sc[...] * correction + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * correction + dot(p.astype(v.dtype), v, (1, 0))
    m_sc[...] = m_new

  @pl.when(j == grid[-1] - 1)
  def _():
    l = l_sc[...]
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = _row(jnp.where(seen, m_sc[...] + jnp.log(l), -jnp.inf))


def _dkdv_kernel(plan_ref, *refs, st, has_table, grid):
  """One key/value tile of one key/value head; the last grid dimension runs over the
  query tiles of every query head of its group."""
  inputs, qtok, ktok, table_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = kernels.split_refs(
      st, refs, 6, has_table)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  num_q = grid[1]
  b, hk, j, t = (pl.program_id(n) for n in range(4))

  @pl.when(t == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_visible(plan_ref, grid, b, lax.rem(t, num_q), j))
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, _, _ = _logits(st, q, k, qtok, ktok, table_ref, hk * st.group + lax.div(t, num_q))
    p = _probabilities(s, lse_ref[...])
    ds = p * (dot(do, v) - _column(delta_ref[...]))
    if st.scale != 1.0:
      ds = ds * st.scale
    dv_sc[...] += dot(p.astype(do.dtype), do, (0, 0))
    dk_sc[...] += dot(ds.astype(q.dtype), q, (0, 0))

  @pl.when(t == st.group * num_q - 1)
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(plan_ref, *refs, st, has_table, grid):
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

  @pl.when(_visible(plan_ref, grid, b, i, j))
  def _():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, buckets, span = _logits(st, q, k, qtok, ktok, table_ref, h)
    ds = _probabilities(s, lse_ref[...]) * (dot(do, v) - _column(delta_ref[...]))
    if has_table:
      dtable_sc[...] = _bucket_sums(ds, buckets, span, dtable_sc[...])
    if st.scale != 1.0:
      ds = ds * st.scale
    dq_sc[...] += dot(ds.astype(k.dtype), k, (1, 0))

  @pl.when(j == grid[-1] - 1)
  def _():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
    if has_table:
      dtable_ref[...] = dtable_sc[...]


def plan(st, q_tok: Tokens, kv_tok: Tokens, bq: int, bk: int, streamed: int):
  """int32 [batch, q tiles, kv tiles]: 2 x the tile to fetch along the `streamed` axis
  (2: key tiles, 1: query tiles) + 1 where some query of the q tile may see some key of
  the kv tile. A skipped tile fetches the last visible one before it (or, before the
  first, the first), so its block index repeats and the pipeline copies nothing."""
  tiles = lambda tok, n: Tokens(*(None if x is None else x.reshape(x.shape[0], -1, n)
                                  for x in tok))
  may_see = functools.partial(kernels.may_see, causal=st.causal)
  per_pair = jax.vmap(jax.vmap(may_see, (None, 0)), (0, None))  # over q tiles, kv tiles
  see = jax.vmap(per_pair)(tiles(q_tok, bq), tiles(kv_tok, bk))
  index = lax.broadcasted_iota(jnp.int32, see.shape, streamed)
  last = lax.cummax(jnp.where(see, index, -1), axis=streamed)
  first = jnp.argmax(see, axis=streamed, keepdims=True).astype(jnp.int32)
  return 2 * jnp.where(last >= 0, last, first) + see.astype(jnp.int32)


def _entry(plan_ref, grid, b, i, j):
  """The flattened plan's entry of (example b, q tile i, kv tile j); `grid` is any
  tuple ending in the numbers of q tiles and kv tiles."""
  nq, nk = grid[-2], grid[-1]
  return plan_ref[(b * nq + i) * nk + j]


def _visible(plan_ref, grid, b, i, j):
  return lax.rem(_entry(plan_ref, grid, b, i, j), 2) != 0


def _fetch(plan_ref, grid, b, i, j):
  """The streamed tile to fetch at grid step (b, i, j)."""
  return lax.div(_entry(plan_ref, grid, b, i, j), 2)


def _heads_major(x, length: int):
  """[b, L, h, d] -> [b, h, length, d], padded."""
  return kernels.pad(jnp.swapaxes(x, 1, 2), length, axis=2)


def _token_rows(st, tok: Tokens, length: int):
  """(padded Tokens [b, length] for the plan, their rows [b, 1, length] for the kernels)."""
  arrays = kernels.token_arrays(st, tok, length)
  return Tokens(*arrays), [x[:, None, :] for x in arrays]


def _params(st, *semantics):
  return None if st.interpret else pltpu.CompilerParams(dimension_semantics=semantics)


def _in_batches(fn, batch: int, tiles: int, args, summed=()):
  """fn(*args) over slices of the batch (axis 0 of every array in `args`) small enough
  that a call's tile plan, `tiles` int32 per example, fits PLAN_BYTES of SMEM; results
  concatenated on axis 0, except those at `summed` (totals over the batch, or None)."""
  per_call = max(1, PLAN_BYTES // (4 * tiles))
  if batch <= per_call:
    return fn(*args)
  parts = [fn(*jax.tree.map(lambda x: x[start:start + per_call], args))
           for start in range(0, batch, per_call)]
  join = lambda n, xs: (None if xs[0] is None else sum(xs) if n in summed
                        else jnp.concatenate(xs))
  return tuple(join(n, xs) for n, xs in enumerate(zip(*parts)))


def forward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, out_dtype=None):
  """(out [b, q_len, heads, d] in out_dtype or q's, lse [b, heads, q_len] float32)."""
  (b, lq, h, d), lk = q.shape, k.shape[1]
  lq_p = padded(lq, st.blocks.q, st.blocks.q_bwd)
  lk_p = padded(lk, st.blocks.kv, st.blocks.kv_bwd)
  tiles = (lq_p // st.blocks.q) * (lk_p // st.blocks.kv)
  return _in_batches(functools.partial(_forward, st, table, out_dtype, lq_p, lk_p), b, tiles,
                     (q, k, v, q_tok, kv_tok))


def _forward(st, table, out_dtype, lq_p, lk_p, q, k, v, q_tok, kv_tok):
  (b, lq, h, d), lk = q.shape, k.shape[1]
  bq, bk, g = st.blocks.q, st.blocks.kv, st.group
  grid = (b, h, lq_p // bq, lk_p // bk)
  (qt, qrows), (kt, krows) = _token_rows(st, q_tok, lq_p), _token_rows(st, kv_tok, lk_p)
  args = [_heads_major(q, lq_p), _heads_major(k, lk_p), _heads_major(v, lk_p), *qrows, *krows]
  sq, fetch = kernels.SQ, functools.partial(_fetch, grid=grid)
  kv_rows = pl.BlockSpec((sq, sq, bk, d),
                         lambda b, h, i, j, p: (b, lax.div(h, g), fetch(p, b=b, i=i, j=j), 0))
  q_stat = pl.BlockSpec((sq, sq, 1, bq), lambda b, h, i, j, p: (b, h, 0, i))
  specs = ([pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0)), kv_rows, kv_rows]
           + [pl.BlockSpec((sq, 1, bq), lambda b, h, i, j, p: (b, 0, i))] * len(qrows)
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, i, j, p: (b, 0, fetch(p, b=b, i=i, j=j)))]
           * len(krows))
  if table is not None:
    args.append(table.astype(jnp.float32))
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  tile_plan = plan(st, qt, kt, bq, bk, streamed=2).reshape(-1)
  args = vary_like([tile_plan, *args], tile_plan, *args)
  kernel = functools.partial(_forward_kernel, st=st, has_table=table is not None, grid=grid)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=specs,
      out_specs=[pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0)), q_stat],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=out_shapes(args, ((b, h, lq_p, d), out_dtype or q.dtype),
                           ((b, h, 1, lq_p), jnp.float32)),
      compiler_params=_params(st, "parallel", "parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="flash_attention_forward_tpu")(*args)
  return jnp.swapaxes(out[:, :, :lq], 1, 2), lse[:, :, 0, :lq]


def backward(st: kernels.Config, q, k, v, q_tok, kv_tok, table, lse, delta, dout,
             grad_dtype=None):
  """(dq, dk, dv in grad_dtype or their inputs' dtypes, dtable float32 or None), given
  the forward's lse and delta = sum(out * dout, -1), both [b, heads, q_len]."""
  (b, lq), lk = q.shape[:2], k.shape[1]
  lq_p = padded(lq, st.blocks.q_bwd, st.blocks.q)
  lk_p = padded(lk, st.blocks.kv_bwd, st.blocks.kv)
  tiles = (lq_p // st.blocks.q_bwd) * (lk_p // st.blocks.kv_bwd)
  return _in_batches(functools.partial(_backward, st, table, grad_dtype, lq_p, lk_p), b,
                     tiles, (q, k, v, q_tok, kv_tok, lse, delta, dout), summed=(3,))


def _backward(st, table, grad_dtype, lq_p, lk_p, q, k, v, q_tok, kv_tok, lse, delta, dout):
  (b, lq, h, d), (lk, hk), g = q.shape, k.shape[1:3], st.group
  bq, bk = st.blocks.q_bwd, st.blocks.kv_bwd
  nq, nk = lq_p // bq, lk_p // bk
  (qt, qrows), (kt, krows) = _token_rows(st, q_tok, lq_p), _token_rows(st, kv_tok, lk_p)
  stat = lambda x: kernels.pad(x, lq_p, axis=2)[:, :, None, :]
  args = [_heads_major(q, lq_p), _heads_major(k, lk_p), _heads_major(v, lk_p),
          _heads_major(dout, lq_p), stat(lse), stat(delta), *qrows, *krows]
  has_table = table is not None
  if has_table:
    args.append(table.astype(jnp.float32))
  q_plan, kv_plan = (plan(st, qt, kt, bq, bk, streamed).reshape(-1) for streamed in (1, 2))
  q_plan, kv_plan, *args = vary_like([q_plan, kv_plan, *args], q_plan, *args)
  dtype = lambda x: grad_dtype or x.dtype
  sq, smem, n_tok = kernels.SQ, [pl.BlockSpec(memory_space=pltpu.SMEM)] * has_table, len(qrows)
  semantics = _params(st, "parallel", "parallel", "parallel", "arbitrary")

  # dK, dV: grid (batch, kv head, kv tile, query tile of each head of the group); the
  # plan is indexed (b, q tile, kv tile) as everywhere, with nq, nk from `plan_grid`.
  grid, plan_grid = (b, hk, nk, g * nq), (b, nq, nk)
  q_tile = lambda p, b, j, t: _fetch(p, plan_grid, b, lax.rem(t, nq), j)
  head = lambda h, t: h * g + lax.div(t, nq)
  q_rows = pl.BlockSpec((sq, sq, bq, d), lambda b, h, j, t, p: (b, head(h, t),
                                                               q_tile(p, b, j, t), 0))
  q_stat = pl.BlockSpec((sq, sq, 1, bq), lambda b, h, j, t, p: (b, head(h, t), 0,
                                                               q_tile(p, b, j, t)))
  kv_rows = pl.BlockSpec((sq, sq, bk, d), lambda b, h, j, t, p: (b, h, j, 0))
  specs = ([q_rows, kv_rows, kv_rows, q_rows, q_stat, q_stat]
           + [pl.BlockSpec((sq, 1, bq), lambda b, h, j, t, p: (b, 0, q_tile(p, b, j, t)))]
           * n_tok
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, j, t, p: (b, 0, j))] * n_tok + smem)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, st=st, has_table=has_table, grid=plan_grid),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=grid, in_specs=specs, out_specs=[kv_rows, kv_rows],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
      out_shape=out_shapes(args, ((b, hk, lk_p, d), dtype(k)),
                           ((b, hk, lk_p, d), dtype(v))),
      compiler_params=semantics, interpret=st.interpret,
      name="flash_attention_dkdv_tpu")(q_plan, *args)

  # dQ (and the bias table's gradient per query tile): grid (batch, head, q tile, kv tile).
  grid = (b, h, nq, nk)
  fetch = functools.partial(_fetch, grid=grid)
  q_rows = pl.BlockSpec((sq, sq, bq, d), lambda b, h, i, j, p: (b, h, i, 0))
  q_stat = pl.BlockSpec((sq, sq, 1, bq), lambda b, h, i, j, p: (b, h, 0, i))
  kv_rows = pl.BlockSpec((sq, sq, bk, d),
                         lambda b, h, i, j, p: (b, lax.div(h, g), fetch(p, b=b, i=i, j=j), 0))
  specs = ([q_rows, kv_rows, kv_rows, q_rows, q_stat, q_stat]
           + [pl.BlockSpec((sq, 1, bq), lambda b, h, i, j, p: (b, 0, i))] * n_tok
           + [pl.BlockSpec((sq, 1, bk), lambda b, h, i, j, p: (b, 0, fetch(p, b=b, i=i, j=j)))]
           * n_tok + smem)
  out_specs, out_shape = [q_rows], [((b, h, lq_p, d), dtype(q))]
  scratch = [pltpu.VMEM((bq, d), jnp.float32)]
  if has_table:
    nb = -(-table.shape[1] // LANES) * LANES
    out_specs.append(pl.BlockSpec((sq, sq, sq, 1, nb), lambda b, h, i, j, p: (b, h, i, 0, 0)))
    out_shape.append(((b, h, nq, 1, nb), jnp.float32))
    scratch.append(pltpu.VMEM((1, nb), jnp.float32))
  dq, *dtable = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, has_table=has_table, grid=grid),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=grid, in_specs=specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shapes(args, *out_shape), compiler_params=semantics,
      interpret=st.interpret, name="flash_attention_dq_tpu")(kv_plan, *args)
  dtable = dtable[0].sum(axis=(0, 2, 3)) if has_table else None
  unmajor = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)
  return unmajor(dq, lq), unmajor(dk, lk), unmajor(dv, lk), dtable
