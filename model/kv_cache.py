"""The key/value cache of decoding: its arrays, writes at each row's own position, and the
masking context of a chunk of new tokens attending to everything cached so far.

A cache is a dict: `index` int32 [batch] (the position the next token is written at),
`segment_ids` and `prefix` int32 [batch, length] (1 on written tokens / on the
bidirectional prefix of a prefix LM), and `layers`, a list of the decoder layers' keys
and values [batch, heads, length, head_dim] (one entry per layer, scanned stacks too),
plus the encoder's output keys and values for cross-attention, computed once. Keys and
values are stored heads-first, as attention reads them: in the [batch, length, heads,
head_dim] layout of training, XLA copies every layer's cache into that order at every
step (about half of a decode step on CPU, bench/decode.py found).
"""

import jax
import jax.numpy as jnp
from jax import lax

from ul2x.partitioning import constrain

KV_AXES = ("batch", "heads", None, "kv")


def write(cached, new, offset, axis: int = 0):
  """cached: [batch, ..., length (dim 1 + axis), ...], new: the same with `chunk`
  positions, offset: int32 [batch] -> cached with row b's chunk written at positions
  offset[b] .. offset[b] + chunk - 1."""
  return jax.vmap(lambda c, n, i: lax.dynamic_update_slice_in_dim(c, n, i, axis=axis))(
      cached, new.astype(cached.dtype), offset)


def heads_first(x):
  """[batch, length, heads, head_dim] -> [batch, heads, length, head_dim]."""
  return jnp.swapaxes(x, 1, 2)


def empty_kv(batch: int, length: int, cfg) -> dict:
  """Zero keys and values {'k', 'v'} [batch, heads, length, head_dim] for one layer."""
  shape = (batch, cfg.num_heads, length, cfg.head_dim)
  zeros = constrain(jnp.zeros(shape, cfg.activation_dtype), KV_AXES)
  return {"k": zeros, "v": zeros}


def empty(batch: int, length: int, layers) -> dict:
  """A cache of `length` positions for `batch` rows around the stack's `layers` cache."""
  zeros = jnp.zeros((batch, length), jnp.int32)
  return {"index": jnp.zeros((batch,), jnp.int32), "segment_ids": zeros, "prefix": zeros,
          "layers": layers}


def chunk_context(cache: dict, chunk: int, segment_ids=None, prefix=None):
  """The masking context of `chunk` new tokens per row written at `cache['index']`.

  segment_ids / prefix: int32 [batch, chunk] (default all 1 / all 0). Returns (ctx, cache
  with their segment ids and prefix written): ctx's `segment_ids`, `positions`, `prefix`
  describe the queries ([batch, chunk]); `kv_segment_ids`, `kv_positions`, `kv_prefix`
  the whole cache ([batch, length]) the queries attend to, causally by position.
  """
  batch, length = cache["segment_ids"].shape
  index = cache["index"]
  positions = index[:, None] + jnp.arange(chunk, dtype=jnp.int32)
  segment_ids = jnp.ones((batch, chunk), jnp.int32) if segment_ids is None else segment_ids
  prefix = jnp.zeros((batch, chunk), jnp.int32) if prefix is None else prefix
  cache = dict(cache, segment_ids=write(cache["segment_ids"], segment_ids, index),
               prefix=write(cache["prefix"], prefix, index))
  ctx = dict(segment_ids=segment_ids, positions=positions, prefix=prefix,
             kv_segment_ids=cache["segment_ids"], kv_prefix=cache["prefix"],
             kv_positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))
  return ctx, cache
