"""What every attention implementation takes besides q, k and v: the per-token mask
inputs (`Tokens`), the one definition of which keys a query sees (`visible`), and a
relative bias given as parameters plus a function of positions (`PositionBias`).

The reference (model/attention.py), ring (kernels/ring_attention.py) and flash
(kernels/flash_kernels.py, inside the Pallas body) implementations all mask with
`visible`, so they cannot disagree on segment, padding, causal or prefix-LM rules.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class Tokens(NamedTuple):
  """Per-token mask inputs of one block, each int [..., len]: segment ids (0 =
  padding), positions, and prefix-LM flags (1 = in the bidirectional prefix) or None."""

  segment_ids: jax.Array
  positions: jax.Array
  prefix: jax.Array | None = None


def visible(q: Tokens, kv: Tokens, causal: bool, outer: bool = True):
  """Boolean [..., q_len, kv_len] from tokens [..., q_len] and [..., kv_len]: the key is
  in the query's segment and not padding and, if causal, its position is <= the
  query's unless both tokens are in the bidirectional prefix (`q.prefix` not None).
  With `outer=False` the tokens come already as a column [..., q_len, 1] and a row
  [..., 1, kv_len] (the TPU kernel's layout). Only indexing, comparisons and logic, so
  it also runs inside a Pallas kernel body."""
  rows = (lambda x: x[..., :, None]) if outer else (lambda x: x)
  cols = (lambda x: x[..., None, :]) if outer else (lambda x: x)
  mask = (rows(q.segment_ids) == cols(kv.segment_ids)) & (cols(kv.segment_ids) != 0)
  if causal:
    allowed = cols(kv.positions) <= rows(q.positions)
    if q.prefix is not None:
      allowed = allowed | ((rows(q.prefix) != 0) & (cols(kv.prefix) != 0))
    mask = mask & allowed
  return mask


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class PositionBias:
  """An additive attention bias computed per tile from global positions.

  params: pytree of float arrays, each with `heads` as its leading dimension
    (differentiable; under tensor parallelism the caller passes the local heads).
  fn: hashable `fn(params, q_positions [b, q], kv_positions [b, k]) -> float32
    [b, heads, q, k]`, e.g. model/position.py's `T5BucketBias`.
  """

  params: Any
  fn: Callable

  def __call__(self, q_positions, kv_positions):
    return self.fn(self.params, q_positions, kv_positions)
