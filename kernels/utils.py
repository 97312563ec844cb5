"""What the kernels share: tile arithmetic (`padded`, `fit`), the Pallas call helpers
(`dot`, `out_shapes`, `triton_params`), and the shard_map variance casts (`vary_like`,
`sum_unvarying`). A leaf: it imports nothing of ul2x, so every kernel module takes these
from here without an import circle."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def padded(length: int, *blocks: int) -> int:
  """`length` rounded up to the largest of `blocks`."""
  step = max(blocks)
  return -(-length // step) * step


def fit(block: int, length: int, smallest: int) -> int:
  """`block`, shrunk for a short `length` to its next power of two, at least `smallest`."""
  return min(block, max(smallest, pl.next_power_of_2(length)))


def triton_params(interpret: bool, num_warps: int):
  """Pallas' Triton parameters, None in interpret mode. Without them jax >= 0.10 lowers
  pallas_call on GPU with Mosaic GPU, which these kernels are not written for."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def out_shapes(args, *shapes):
  """ShapeDtypeStructs of (shape, dtype) pairs, varying over the manual mesh axes of
  any of `args` (inside shard_map, where the arguments are cast to vary alike). Inside
  shard_map they always carry that type, also when it varies over nothing (inputs
  replicated, e.g. over mesh axes of size 1): pallas_call requires it there."""
  mat = getattr(jax.typeof(args[0]), "mat", None)
  inside = bool(jax.sharding.get_abstract_mesh().manual_axes)
  kw = dict(manual_axis_type=mat) if mat is not None and inside else {}
  return [jax.ShapeDtypeStruct(shape, dtype, **kw) for shape, dtype in shapes]


def dot(a, b, contract=(1, 1)):
  """a . b over dims `contract` (default a @ b.T), accumulated in float32."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def varying_axes(x) -> frozenset:
  """The manual mesh axes `x` varies over inside shard_map (none outside, or with the
  varying-axes check off)."""
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def vary_like(tree, *refs):
  """Marks `tree` as varying over the manual mesh axes `refs` vary over (inside
  shard_map), so loop carries keep one type and the transpose sums gradients."""
  axes = set()
  for r in jax.tree.leaves(refs):
    axes |= varying_axes(r)

  def cast(x):
    missing = tuple(sorted(axes - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def sum_unvarying(grad, primal):
  """Inside shard_map: `grad` summed over the manual mesh axes it varies over and its
  primal does not (a bias table replicated over the batch axes gets the sum of every
  batch shard's gradient), so the cotangent has its primal's type."""
  if grad is None:
    return None
  extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
  return jax.lax.psum(grad, extra) if extra else grad
