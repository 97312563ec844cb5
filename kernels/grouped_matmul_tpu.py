"""The TPU (Mosaic) side of the Pallas grouped matmul: XLA's TPU `ragged_dot` already
runs the forward and dX as a grouped kernel (libtpu's `ragged-dot` custom call, dense
FLOPs), but computes dW, ragged in the contracting dimension, as a masked product over
every group: G times the FLOPs. `grouped_matmul` here keeps ragged_dot for the forward
and dX and computes dW with `tgmm`, which visits each group's row tiles only.

`tgmm`'s grid is (K tiles, N tiles, visits). A visit is one (group, row tile) pair, in
group order, from a plan computed outside the kernel and prefetched into SMEM: every
group gets at least one visit (an empty group's visit writes its zeros), a tile shared by
two groups is visited once for each. The dW tile accumulates in VMEM over a group's
visits and is written at its last one; the visits past the plan's end repeat the last
one's blocks (nothing fetched) and do nothing.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ul2x.kernels import grouped_matmul_pallas as gp
from ul2x.kernels.grouped_matmul import grouped_matmul as ragged_dot_matmul
from ul2x.kernels.utils import dot, out_shapes, padded, sum_unvarying, vary_like

LANES = 128


@dataclasses.dataclass(frozen=True)
class Blocks:
  """dW tile sizes: rows per visit (a multiple of 16), and the K and N tile (multiples
  of 128: the lanes)."""

  m: int = 512
  k: int = 512
  n: int = 512


DEFAULT_BLOCKS = Blocks()
INTERPRET_BLOCKS = Blocks(16, LANES, LANES)


def _fit(block: int, size: int, smallest: int) -> int:
  """The largest multiple of `smallest` up to `block` that divides `size` rounded up to
  `smallest` (so only that rounding pads: 640 takes 128, not 512 padded to 1024)."""
  rounded = padded(size, smallest)
  return max(b for b in range(smallest, min(block, rounded) + 1, smallest) if rounded % b == 0)


def visit_plan(group_sizes, num_tiles: int, bm: int):
  """int32 [3, V] rows (group, row tile, active) of the V = num_tiles + 2G visits:
  each group's row tiles in order (one for an empty group), then repeats of the last
  real visit marked inactive."""
  starts, ends = gp.group_bounds(group_sizes)
  groups = group_sizes.shape[0]
  first = jnp.minimum(lax.div(starts, bm), num_tiles - 1)
  count = jnp.maximum(lax.div(ends + bm - 1, bm) - first, 1)
  offsets = jnp.cumsum(count)
  v = jnp.arange(num_tiles + 2 * groups, dtype=jnp.int32)
  real = jnp.minimum(v, offsets[-1] - 1)
  group = jnp.searchsorted(offsets, real, side="right").astype(jnp.int32)
  tile = first[group] + real - (offsets[group] - count[group])
  return jnp.stack([group, tile, (v < offsets[-1]).astype(jnp.int32)])


def _tgmm_kernel(plan_ref, starts_ref, ends_ref, x_ref, d_ref, o_ref, acc_ref, *,
                 visits: int):
  v = pl.program_id(2)
  group, active = plan_ref[0, v], plan_ref[2, v]
  bm = x_ref.shape[0]
  is_first = (v == 0) | (plan_ref[0, jnp.maximum(v - 1, 0)] != group)
  following = jnp.minimum(v + 1, visits - 1)
  is_last = (active == 1) & ((v == visits - 1) | (plan_ref[2, following] == 0)
                             | (plan_ref[0, following] != group))

  @pl.when(is_first & (active == 1))
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(active == 1)
  def _():
    def mine(ref):  # the block's rows of this group, others zero (no inf * 0 in the dot)
      rows = plan_ref[1, v] * bm + lax.broadcasted_iota(jnp.int32, ref.shape, 0)
      keep = (rows >= starts_ref[group]) & (rows < ends_ref[group])
      return jnp.where(keep, ref[...], jnp.zeros((), ref.dtype))

    acc_ref[...] += dot(mine(x_ref), mine(d_ref), (0, 0))

  @pl.when(is_last)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x, d, group_sizes, *, blocks: Blocks = DEFAULT_BLOCKS, interpret: bool = False,
         out_dtype=None):
  """x [M, K], d [M, N] -> [G, K, N]: per group g, x[rows of g].T @ d[rows of g]."""
  (m, k), n, groups = x.shape, d.shape[1], group_sizes.shape[0]
  bm, bk, bn = _fit(blocks.m, m, 16), _fit(blocks.k, k, LANES), _fit(blocks.n, n, LANES)
  mp, kp, np_ = padded(m, bm), padded(k, bk), padded(n, bn)
  plan = visit_plan(group_sizes, mp // bm, bm)
  starts, ends = gp.group_bounds(group_sizes)
  visits = plan.shape[1]
  args = vary_like([plan, starts, ends, gp.pad_to(x, (mp, kp)), gp.pad_to(d, (mp, np_))],
                   x, d)
  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(kp // bk, np_ // bn, visits),
      in_specs=[smem, smem, pl.BlockSpec((bm, bk), lambda i, j, v, p: (p[1, v], i)),
                pl.BlockSpec((bm, bn), lambda i, j, v, p: (p[1, v], j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, v, p: (p[0, v], i, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)])
  params = None if interpret else pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"))
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, visits=visits), grid_spec=grid_spec,
      out_shape=out_shapes(args, ((groups, kp, np_), out_dtype or x.dtype))[0],
      compiler_params=params, interpret=interpret,
      cost_estimate=gp.cost(m, k, n, groups, x.dtype.itemsize),
      name="grouped_matmul_weight_grad_tpu")(*args)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x, w, group_sizes, blocks: Blocks = DEFAULT_BLOCKS,
                   interpret: bool = False):
  """kernels/grouped_matmul.py's `grouped_matmul` (ragged_dot) with dW from `tgmm`."""
  return ragged_dot_matmul(x, w, group_sizes)


def _forward(x, w, group_sizes, blocks, interpret):
  out, dx_fn = jax.vjp(lambda x: ragged_dot_matmul(x, w, group_sizes), x)
  return out, (x, w, group_sizes, dx_fn)


def _backward(blocks, interpret, residuals, dout):
  x, w, group_sizes, dx_fn = residuals
  dw = tgmm(x, dout.astype(x.dtype), group_sizes, blocks=blocks, interpret=interpret,
            out_dtype=w.dtype)
  # inside shard_map, w replicated over the batch axes gets every batch shard's dW
  return dx_fn(dout)[0], sum_unvarying(dw, w), np.zeros(group_sizes.shape, jax.dtypes.float0)


grouped_matmul.defvjp(_forward, _backward)
