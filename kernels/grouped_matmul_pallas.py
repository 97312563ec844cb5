"""Pallas grouped matmul for dropless MoE, the twin of `jax.lax.ragged_dot` in
kernels/grouped_matmul.py: rows of x sorted by group, row i multiplied by w[g] for the
group g it falls in, rows past sum(group_sizes) giving zeros, with a custom VJP.

Why a kernel: XLA computes the weight gradient of `ragged_dot` (ragged in the
contracting dimension) as a dense product over every group, G times the FLOPs, on TPU
(libtpu's compiled HLO: a masked [G, K, N] convolution fusion); on GPU (XLA:GPU of jax
0.10.2, compiled for an H200) and on CPU it expands all three products that way. Here
every product touches only its group's rows, so each of the three matmuls (forward, dX,
dW) costs about one dense matmul plus one extra tile per group boundary.

Three calls, each a grid of output tiles (`Blocks` rows x columns, looping over the
contracted dimension in `Blocks.k` steps):
- `gmm` (forward, and dX with w transposed): out[M, N] tile t loops over the groups
  whose rows meet rows [t*bm, (t+1)*bm), masking the others' rows to zero.
- `tgmm` (dW): dw[g] tile loops over the row tiles of group g, masking rows outside it.
Tiles are aligned to the row tiles, so no load starts mid-tile. The bodies use only
what Triton lowers and the interpreter runs (2-D dots, `where`, `fori_loop`); this
module calls them with the Triton backend on GPU or in interpret mode anywhere.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ul2x.kernels.utils import (dot, fit, out_shapes, padded, sum_unvarying, triton_params,
                                vary_like)

_MIN_BLOCK = 16  # Triton's smallest dot operand


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two >= 16): rows, contracted dimension, columns."""

  m: int = 64
  k: int = 64
  n: int = 64


DEFAULT_BLOCKS = {"gpu": Blocks(64, 64, 128), "cpu": Blocks(16, 16, 16)}
NUM_WARPS = 4  # per Triton program


def pad_to(x, sizes):
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, sizes)])


def _pow2_pad(a):
  """1-D metadata padded to a power of two (Triton tensors' shapes)."""
  return jnp.pad(a, (0, pl.next_power_of_2(a.shape[0]) - a.shape[0]))


def cost(m: int, k: int, n: int, groups: int, itemsize: int) -> pl.CostEstimate:
  """XLA's estimate of one grouped matmul [m, k] x per-row [k, n] of `groups` weights:
  one dense matmul's FLOPs, each operand read once."""
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=itemsize * (m * k + groups * k * n + m * n))


def group_bounds(group_sizes):
  """(starts, ends) int32 [G]: the rows [starts[g], ends[g]) of group g."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return ends - group_sizes.astype(jnp.int32), ends


def tile_groups(starts, ends, num_tiles: int, bm: int):
  """(lo, hi) int32 [num_tiles]: the groups lo..hi-1 hold the rows of tile t (empty
  groups inside that range included; they mask every row)."""
  first = jnp.arange(num_tiles, dtype=jnp.int32) * bm
  lo = jnp.searchsorted(ends, first, side="right").astype(jnp.int32)
  hi = jnp.searchsorted(starts, first + bm, side="left").astype(jnp.int32)
  return lo, hi


def _rows_in(start, first, bm: int, end):
  rows = first + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  return (rows >= start) & (rows < end)


def _gmm_kernel(lo_ref, hi_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *, num_k: int,
                bk: int, transpose: bool):
  """One [bm, bn] output tile: the sum over the groups meeting its rows of
  (x's rows of that group) @ w[g] (w[g].T if `transpose`)."""
  t = pl.program_id(0)
  bm = x_ref.shape[0]

  def group(g, acc):
    mask = _rows_in(starts_ref[g], t * bm, bm, ends_ref[g])

    def step(kk, acc):
      xs = jnp.where(mask, x_ref[:, pl.ds(kk * bk, bk)], jnp.zeros((), x_ref.dtype))
      if transpose:
        return acc + dot(xs, w_ref[g, :, pl.ds(kk * bk, bk)], (1, 1))
      return acc + dot(xs, w_ref[g, pl.ds(kk * bk, bk), :], (1, 0))

    return lax.fori_loop(0, num_k, step, acc)

  acc = lax.fori_loop(lo_ref[t], hi_ref[t], group, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, d_ref, o_ref, *, bm: int):
  """One [bk, bn] tile of dw[g] = (x's rows of group g).T @ (d's rows of group g)."""
  g = pl.program_id(0)
  start, end = starts_ref[g], ends_ref[g]

  def step(t, acc):
    rows, mine = pl.ds(t * bm, bm), _rows_in(start, t * bm, bm, end)
    xs = jnp.where(mine, x_ref[rows, :], jnp.zeros((), x_ref.dtype))
    ds = jnp.where(mine, d_ref[rows, :], jnp.zeros((), d_ref.dtype))  # no inf * 0 from others
    return acc + dot(xs, ds, (0, 0))

  acc = lax.fori_loop(lax.div(start, bm), lax.div(end + bm - 1, bm), step,
                      jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _whole(a):
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def gmm(x, w, group_sizes, *, transpose: bool = False, blocks: Blocks,
        interpret: bool = False, out_dtype=None):
  """x [M, C] @ per-row w[g] ([G, C, N], or [G, N, C] with `transpose`) -> [M, N]."""
  (m, c), n = x.shape, w.shape[1 if transpose else 2]
  bm, bk, bn = (fit(b, size, _MIN_BLOCK) for b, size in ((blocks.m, m), (blocks.k, c),
                                                          (blocks.n, n)))
  mp, cp, np_ = padded(m, bm), padded(c, bk), padded(n, bn)
  starts, ends = group_bounds(group_sizes)
  lo, hi = tile_groups(starts, ends, mp // bm, bm)
  w = pad_to(w, (w.shape[0], np_, cp) if transpose else (w.shape[0], cp, np_))
  meta = [_pow2_pad(a) for a in (lo, hi, starts, ends)]
  args = vary_like([*meta, pad_to(x, (mp, cp)), w], x, w)
  w_spec = (pl.BlockSpec((w.shape[0], bn, cp), lambda i, j: (0, j, 0)) if transpose
            else pl.BlockSpec((w.shape[0], cp, bn), lambda i, j: (0, 0, j)))
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, num_k=cp // bk, bk=bk, transpose=transpose),
      grid=(mp // bm, np_ // bn),
      in_specs=[*map(_whole, meta), pl.BlockSpec((bm, cp), lambda i, j: (i, 0)), w_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=out_shapes(args, ((mp, np_), out_dtype or x.dtype))[0],
      interpret=interpret, compiler_params=triton_params(interpret, NUM_WARPS),
      cost_estimate=cost(m, c, n, w.shape[0], x.dtype.itemsize), name="grouped_matmul")(*args)
  return out[:m, :n]


def tgmm(x, d, group_sizes, *, blocks: Blocks, interpret: bool = False, out_dtype=None):
  """x [M, K], d [M, N] -> [G, K, N]: per group g, x[rows of g].T @ d[rows of g]."""
  (m, k), n, groups = x.shape, d.shape[1], group_sizes.shape[0]
  bm, bk, bn = (fit(b, size, _MIN_BLOCK) for b, size in ((blocks.m, m), (blocks.k, k),
                                                          (blocks.n, n)))
  mp, kp, np_ = padded(m, bm), padded(k, bk), padded(n, bn)
  meta = [_pow2_pad(a) for a in group_bounds(group_sizes)]
  args = vary_like([*meta, pad_to(x, (mp, kp)), pad_to(d, (mp, np_))], x, d)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm),
      grid=(groups, kp // bk, np_ // bn),
      in_specs=[*map(_whole, meta), pl.BlockSpec((mp, bk), lambda g, i, j: (0, i)),
                pl.BlockSpec((mp, bn), lambda g, i, j: (0, j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
      out_shape=out_shapes(args, ((groups, kp, np_), out_dtype or x.dtype))[0],
      interpret=interpret, compiler_params=triton_params(interpret, NUM_WARPS),
      cost_estimate=cost(m, k, n, groups, x.dtype.itemsize),
      name="grouped_matmul_weight_grad")(*args)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x, w, group_sizes, blocks: Blocks = DEFAULT_BLOCKS["gpu"],
                   interpret: bool = False):
  """x: [M, K] rows sorted by group; w: [G, K, N] (both of one dtype); group_sizes: [G]
  -> [M, N], as kernels/grouped_matmul.py's `grouped_matmul` (rows past the groups give
  zeros)."""
  if x.dtype != w.dtype:
    raise ValueError(f"grouped_matmul takes x and w of one dtype, not {x.dtype} and "
                     f"{w.dtype}; cast them first.")
  return gmm(x, w, group_sizes, blocks=blocks, interpret=interpret)


def _forward(x, w, group_sizes, blocks, interpret):
  return grouped_matmul(x, w, group_sizes, blocks, interpret), (x, w, group_sizes)


def _backward(blocks, interpret, residuals, dout):
  x, w, group_sizes = residuals
  dout = dout.astype(x.dtype)
  dx = gmm(dout, w, group_sizes, transpose=True, blocks=blocks, interpret=interpret)
  dw = tgmm(x, dout, group_sizes, blocks=blocks, interpret=interpret)
  # Inside shard_map each gradient is summed over the mesh axes it varies over and its
  # primal does not: w replicated over the batch axes gets every batch shard's dW, rows
  # replicated over `tensor` (w split there) get every tensor shard's dX.
  return (sum_unvarying(dx, x), sum_unvarying(dw, w),
          np.zeros(group_sizes.shape, jax.dtypes.float0))


grouped_matmul.defvjp(_forward, _backward)
