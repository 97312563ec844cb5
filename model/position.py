"""Position encodings: T5 bucketed relative position bias and rotary embeddings (RoPE)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.kernels.attention_inputs import PositionBias


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5 buckets: exact for small distances, log-spaced up to `max_distance`.

  relative_position = key_position - query_position (int array of any shape).
  """
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  n_float = jnp.maximum(n, 1).astype(jnp.float32)
  val_if_large = max_exact + (
      jnp.log(n_float / max_exact) / math.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


@dataclasses.dataclass(frozen=True)
class T5BucketBias:
  """The T5 bias as a pure function of a table and positions, holding only the bucket
  settings: (table [heads, buckets], positions) -> [b, heads, q, k] float32. Hashable,
  so ring and flash attention can compute it one block at a time (the `fn` of a
  `PositionBias`); `RelativePositionBias` is the module that owns the table."""

  num_buckets: int
  max_distance: int
  bidirectional: bool

  def buckets(self, relative_position):
    """int buckets of key - query positions, any shape."""
    return relative_position_bucket(relative_position, self.bidirectional, self.num_buckets,
                                    self.max_distance)

  def __call__(self, table, q_positions, kv_positions):
    buckets = self.buckets(kv_positions[:, None, :] - q_positions[:, :, None])
    return jnp.transpose(jnp.take(table, buckets, axis=1), (1, 0, 2, 3))


class RelativePositionBias(nnx.Module):
  """Learned per-head bias indexed by the T5 bucket of (key - query) position: the
  parameter table, applied by `T5BucketBias`."""

  def __init__(self, num_buckets: int, max_distance: int, num_heads: int,
               bidirectional: bool, *, rngs: nnx.Rngs):
    table = jax.random.normal(rngs.params(), (num_heads, num_buckets), jnp.float32)
    self.rel_embedding = nnx.Param(table * num_buckets ** -0.5, axes=("heads", "relpos_buckets"))
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional

  def __call__(self, q_positions, kv_positions):
    """positions: [batch, len] -> bias [batch, heads, q_len, kv_len] float32."""
    return self.blockwise()(q_positions, kv_positions)

  def blockwise(self) -> PositionBias:
    """The bias as its table and bucket function, for attention that computes it
    per block (ring, flash) instead of taking a dense [batch, heads, q, k] tensor."""
    fn = T5BucketBias(self.num_buckets, self.max_distance, self.bidirectional)
    return PositionBias(self.rel_embedding[...], fn)


def apply_rope(x, positions, max_wavelength: float = 10_000.0):
  """Rotary embedding on the last dim. x: [batch, len, heads, head_dim]; positions: [batch, len]."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [b, len, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
