"""Ring attention (Liu et al., 2023): attention over a sequence sharded across devices.

`ring_attention` is a pure per-shard function, meant to run inside the caller's
`jax.shard_map` with the length dimension split over the mesh axis `axis_name`.
Each device keeps its block of queries; the key/value blocks (with their segment
ids, positions and prefix flags) travel round the ring with `lax.ppermute`, and
the per-block results are merged with an online softmax. The backward pass is a
`custom_vjp` that sends K, V and their partial gradients round the ring again, so
activation memory per device is proportional to the local block, never to the
full sequence.

Masks come from global positions and segment ids (0 = padding), so the kernel is
indifferent to how the sequence is laid out over devices: `zigzag` / `unzigzag`
reorder a batch so that every device holds as much of the causal triangle as any
other. A relative position bias is passed as a `PositionBias` (parameters plus a
function of query/key positions) and computed for one tile at a time; the
gradient of its parameters is returned by the backward pass.

The computation of one query block against one key/value block is pluggable
(`block_attention`): `BlockwiseAttention` is plain JAX; a Pallas flash kernel with
the same `forward` / `backward` methods can replace it.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax


class Tokens(NamedTuple):
  """Per-token mask inputs of one block, each [batch, len]; `prefix` may be None."""

  segment_ids: jax.Array
  positions: jax.Array
  prefix: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["fn"])
@dataclasses.dataclass(frozen=True)
class PositionBias:
  """An additive attention bias computed per tile from global positions.

  params: pytree of float arrays, each with `heads` as its leading dimension
    (differentiable; under tensor parallelism the caller passes the local heads).
  fn: hashable `fn(params, q_positions [b, q], kv_positions [b, k]) -> float32
    [b, heads, q, k]`, e.g. the T5 bucketed relative bias of model/position.py.
  """

  params: Any
  fn: Callable

  def __call__(self, q_positions, kv_positions):
    return self.fn(self.params, q_positions, kv_positions)


class BlockAttentionFn(Protocol):
  """One query block against one key/value block, in float32.

  forward(q [b,q,h,d], k, v [b,k,h,d], q_tok, kv_tok, bias, *, causal, scale)
    -> (out [b,q,h,d] normalized over this block's keys, lse [b,h,q]); rows with no
    visible key have out = 0 and lse = -inf.
  backward(q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal, scale)
    -> grads + this block's (dq, dk, dv, dparams), given the final lse and
    delta = sum(out * dout, -1), both [b,h,q]; `grads` are float32 accumulators
    (added to in place), dparams matches bias.params (None without a bias).
  """

  def forward(self, q, k, v, q_tok, kv_tok, bias, *, causal, scale): ...

  def backward(self, q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal,
               scale): ...


def _vary_like(tree, *refs):
  """Marks `tree` as varying over the manual mesh axes `refs` vary over (inside
  shard_map), so loop carries keep one type and the transpose sums gradients."""
  axes = set()
  for r in jax.tree.leaves(refs):
    axes |= set(jax.typeof(r).mat.varying)

  def cast(x):
    missing = tuple(sorted(axes - set(jax.typeof(x).mat.varying)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def visible(q_tok: Tokens, kv_tok: Tokens, causal: bool):
  """Boolean [batch, q, k]: same non-padding segment and, if causal, key position
  <= query position unless both tokens are in the bidirectional prefix."""
  mask = ((q_tok.segment_ids[:, :, None] == kv_tok.segment_ids[:, None, :])
          & (kv_tok.segment_ids[:, None, :] != 0))
  if causal:
    allowed = kv_tok.positions[:, None, :] <= q_tok.positions[:, :, None]
    if q_tok.prefix is not None:
      allowed |= q_tok.prefix[:, :, None].astype(bool) & kv_tok.prefix[:, None, :].astype(bool)
    mask &= allowed
  return mask


def _tile_size(length: int, block_size: int) -> int:
  """The largest divisor of `length` that is at most `block_size`."""
  for size in range(min(length, block_size), 0, -1):
    if length % size == 0:
      return size
  raise ValueError(f"block_size={block_size} must be positive.")


def _slice(tree, start, size: int, axis: int = 1):
  return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis), tree)


def _update(x, tile, start, axis: int = 1):
  return lax.dynamic_update_slice_in_dim(x, tile.astype(x.dtype), start, axis)


def _position_bias(fn, params):
  """The `PositionBias` of `fn` with `params` (None without a bias function)."""
  return None if fn is None else PositionBias(params, fn)


def _logits(q, k, q_tok, kv_tok, bias, scale, mask):
  """Masked float32 logits [b, h, q, k] of one tile (-inf where not visible)."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias(q_tok.positions, kv_tok.positions)
  return jnp.where(mask[:, None], s, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class BlockwiseAttention:
  """Plain-JAX `BlockAttentionFn`: tiles of at most `block_size` queries x keys
  (the largest divisor of each block length), an online softmax over key tiles, and
  `lax.cond` skipping every tile in which no query sees any key. Besides its inputs
  and outputs it holds O(block_size^2) logits per (batch, head) and one tile of each
  input; results are written into the outputs tile by tile."""

  block_size: int = 512

  def forward(self, q, k, v, q_tok, kv_tok, bias, *, causal, scale):
    (b, lq, h, d), lk = q.shape, k.shape[1]
    tq, tk = _tile_size(lq, self.block_size), _tile_size(lk, self.block_size)

    def q_tile(i, carry):
      out, lse = carry
      qi, qtok = _slice((q, q_tok), i * tq, tq)

      def kv_tile(j, state):
        kj, vj, ktok = _slice((k, v, kv_tok), j * tk, tk)
        mask = visible(qtok, ktok, causal)

        def attend(state):
          acc, m, l = state
          s = _logits(qi, kj, qtok, ktok, bias, scale, mask)
          m_new = jnp.maximum(m, jnp.max(s, axis=-1))
          m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
          p = jnp.exp(s - m_safe[..., None])
          correction = jnp.exp(m - m_safe)
          pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(vj.dtype), vj,
                          preferred_element_type=jnp.float32)
          acc = acc * jnp.swapaxes(correction, 1, 2)[..., None] + pv
          return acc, m_new, l * correction + jnp.sum(p, axis=-1)

        return lax.cond(jnp.any(mask), attend, lambda state: state, state)

      state = (jnp.zeros((b, tq, h, d), jnp.float32), jnp.full((b, h, tq), -jnp.inf),
               jnp.zeros((b, h, tq), jnp.float32))
      acc, m, l = lax.fori_loop(0, lk // tk, kv_tile, _vary_like(state, q, k, bias))
      seen = l > 0
      l = jnp.where(seen, l, 1.0)
      out = _update(out, acc / jnp.swapaxes(l, 1, 2)[..., None], i * tq)
      lse = _update(lse, jnp.where(seen, m + jnp.log(l), -jnp.inf), i * tq, axis=2)
      return out, lse

    init = (jnp.zeros((b, lq, h, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf))
    return lax.fori_loop(0, lq // tq, q_tile, _vary_like(init, q, k, bias))

  def backward(self, q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal,
               scale):
    lq, lk = q.shape[1], k.shape[1]
    tq, tk = _tile_size(lq, self.block_size), _tile_size(lk, self.block_size)
    params, fn = (None, None) if bias is None else (bias.params, bias.fn)

    def q_tile(i, grads):
      dq, dk, dv, dparams = grads
      qi, qtok, do_i = _slice((q, q_tok, dout), i * tq, tq)
      lse_i, delta_i = _slice((lse, delta), i * tq, tq, axis=2)
      lse_i = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)

      def kv_tile(j, carry):
        dq_i, dk, dv, dparams = carry
        kj, vj, ktok = _slice((k, v, kv_tok), j * tk, tk)
        mask = visible(qtok, ktok, causal)

        def tile_grads():
          logits = lambda p: _logits(qi, kj, qtok, ktok, _position_bias(fn, p), scale, mask)
          s, pull = jax.vjp(logits, params)
          p = jnp.exp(s - lse_i[..., None])
          dv_j = jnp.einsum("bhqk,bqhd->bkhd", p, do_i.astype(jnp.float32))
          dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, vj, preferred_element_type=jnp.float32)
          ds = p * (dp - delta_i[..., None])
          dq_j = jnp.einsum("bhqk,bkhd->bqhd", ds, kj.astype(jnp.float32)) * scale
          dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qi.astype(jnp.float32)) * scale
          return dq_j, dk_j, dv_j, None if params is None else pull(ds)[0]

        def skip():
          zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
          return _vary_like((zeros(qi), zeros(kj), zeros(vj), jax.tree.map(zeros, params)),
                            qi, kj, params)

        dq_j, dk_j, dv_j, dparams_j = lax.cond(jnp.any(mask), tile_grads, skip)
        add_tile = lambda x, tile: _update(x, _slice(x, j * tk, tk) + tile, j * tk)
        return (dq_i + dq_j, add_tile(dk, dk_j), add_tile(dv, dv_j),
                jax.tree.map(jnp.add, dparams, dparams_j))

      carry = (_slice(dq, i * tq, tq), dk, dv, dparams)
      dq_i, dk, dv, dparams = lax.fori_loop(0, lk // tk, kv_tile, carry)
      return _update(dq, dq_i, i * tq), dk, dv, dparams

    return lax.fori_loop(0, lq // tq, q_tile, grads)


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  axis_name: Any
  block_attention: BlockAttentionFn
  bias_fn: Callable | None


def _ring_size(axis_name) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def _rotate(tree, axis_name, n: int):
  """Sends every leaf to the next device of the ring (i -> i + 1)."""
  return lax.ppermute(tree, axis_name, perm=[(i, (i + 1) % n) for i in range(n)])


def _merge(out, lse, out_block, lse_block):
  """Online-softmax merge of two normalized partial results over disjoint keys."""
  new = jnp.logaddexp(lse, lse_block)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  w = lambda l: jnp.swapaxes(jnp.exp(l - safe), 1, 2)[..., None]  # [b, q, h, 1]
  return out * w(lse) + out_block * w(lse_block), new


def _ring_forward(static: _Static, q, k, v, q_tok, kv_tok, params):
  attend = functools.partial(static.block_attention.forward, causal=static.causal,
                             scale=static.scale)
  bias = _position_bias(static.bias_fn, params)
  n = _ring_size(static.axis_name)
  out, lse = attend(q, k, v, q_tok, kv_tok, bias)
  if n > 1:
    # The next block is requested before this one is used, so that the transfer
    # can overlap the computation.
    def step(carry, _):
      out, lse, block = carry
      following = _rotate(block, static.axis_name, n)
      out, lse = _merge(out, lse, *attend(q, block[0], block[1], q_tok, block[2], bias))
      return (out, lse, following), None

    block = _rotate((k, v, kv_tok), static.axis_name, n)
    (out, lse, block), _ = lax.scan(step, (out, lse, block), length=n - 2)
    out, lse = _merge(out, lse, *attend(q, block[0], block[1], q_tok, block[2], bias))
  out = out.astype(q.dtype)
  return out, (q, k, v, q_tok, kv_tok, params, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(static: _Static, q, k, v, q_tok, kv_tok, params):
  return _ring_forward(static, q, k, v, q_tok, kv_tok, params)[0]


def _ring_backward(static: _Static, residuals, dout):
  q, k, v, q_tok, kv_tok, params, out, lse = residuals
  grads = functools.partial(static.block_attention.backward, causal=static.causal,
                            scale=static.scale)
  bias = _position_bias(static.bias_fn, params)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv, dparams = _vary_like((zeros(q), zeros(k), zeros(v), jax.tree.map(zeros, params)),
                                   q, k)
  n = _ring_size(static.axis_name)
  if n > 1:
    # Each K/V block travels with the gradient accumulated for it so far; after n hops
    # that gradient is complete and back on the device that owns the block.
    def step(carry, _):
      dq, dparams, block, (dk, dv) = carry
      following = _rotate(block, static.axis_name, n)
      dq, dk, dv, dparams = grads(q, block[0], block[1], q_tok, block[2], bias, lse, delta,
                                  dout, (dq, dk, dv, dparams))
      return (dq, dparams, following, _rotate((dk, dv), static.axis_name, n)), None

    carry = (dq, dparams, (k, v, kv_tok), (dk, dv))
    (dq, dparams, (k, v, kv_tok), (dk, dv)), _ = lax.scan(step, carry, length=n - 1)
  dq, dk, dv, dparams = grads(q, k, v, q_tok, kv_tok, bias, lse, delta, dout,
                              (dq, dk, dv, dparams))
  if n > 1:
    dk, dv = _rotate((dk, dv), static.axis_name, n)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, dparams)


_ring.defvjp(_ring_forward, _ring_backward)


def ring_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                   causal: bool = False, q_prefix=None, kv_prefix=None,
                   bias: PositionBias | None = None, scale: float = 1.0, axis_name=None,
                   block_attention: BlockAttentionFn = BlockwiseAttention()):
  """Attention of this device's queries over the keys of every device on the ring.

  Per-shard arrays: q: [batch, q_block, heads, head_dim]; k, v: [batch, kv_block,
  heads, head_dim]; segment ids (0 = padding), global positions and prefix flags
  (prefix-LM: bidirectional where both tokens have 1; used only if causal):
  [batch, block]. `bias`: a `PositionBias` or None. `axis_name`: the mesh axis (or
  tuple of axes) the length dimension is split over, None for a single device.
  Returns [batch, q_block, heads, head_dim] in q's dtype; softmax in float32. Query
  rows that see no key (padding) are 0.
  """
  if bias is not None and not isinstance(bias, PositionBias):
    raise TypeError(
        f"ring_attention takes bias as a PositionBias (parameters + a function of "
        f"positions), not {type(bias).__name__}: a dense [batch, heads, q_len, kv_len] bias "
        "would hold the whole sequence on every device.")
  if causal and (q_prefix is None) != (kv_prefix is None):
    raise ValueError("prefix-LM attention needs both q_prefix and kv_prefix (or neither).")
  prefix = causal and q_prefix is not None
  q_tok = Tokens(q_segment_ids, q_positions, q_prefix if prefix else None)
  kv_tok = Tokens(kv_segment_ids, kv_positions, kv_prefix if prefix else None)
  params = None if bias is None else _vary_like(bias.params, q, k)
  static = _Static(bool(causal), float(scale), axis_name, block_attention,
                   None if bias is None else bias.fn)
  return _ring(static, q, k, v, q_tok, kv_tok, params)


def _zigzag_shape(x, num_shards: int, axis: int):
  length = x.shape[axis]
  if length % (2 * num_shards):
    raise ValueError(
        f"zigzag load balancing splits the length into 2 x {num_shards} shards = "
        f"{2 * num_shards} chunks, but the length is {length}; pad the length to a "
        f"multiple of {2 * num_shards}.")
  return x.shape[:axis] + (2, num_shards, length // (2 * num_shards)) + x.shape[axis + 1:]


def zigzag(x, num_shards: int, axis: int = 1):
  """Reorders `axis` (length L) so that its i-th contiguous L/num_shards block holds
  chunks i and 2*num_shards-1-i of the original order, each causal block the same work."""
  halves = x.reshape(_zigzag_shape(x, num_shards, axis))
  first = lax.index_in_dim(halves, 0, axis, keepdims=False)
  second = jnp.flip(lax.index_in_dim(halves, 1, axis, keepdims=False), axis)
  return jnp.stack([first, second], axis=axis + 1).reshape(x.shape)


def unzigzag(x, num_shards: int, axis: int = 1):
  """The inverse of `zigzag`."""
  shape = _zigzag_shape(x, num_shards, axis)
  pairs = x.reshape(shape[:axis] + (num_shards, 2) + shape[axis + 2:])
  first = lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
  second = jnp.flip(lax.index_in_dim(pairs, 1, axis + 1, keepdims=False), axis)
  return jnp.stack([first, second], axis=axis).reshape(x.shape)
