"""Ring attention (Liu et al., 2023): attention over a sequence sharded across devices.

`ring_attention` is a pure per-shard function, meant to run inside the caller's
`jax.shard_map` with the length dimension split over the mesh axis `axis_name`.
Each device keeps its block of queries; the key/value blocks (with their segment
ids, positions and prefix flags) travel round the ring with `lax.ppermute`, one
tile at a time: a tile leaves for the next device while the following one is
computed, and the arriving tile takes its slot, so no device ever holds two
blocks. Results are merged with an online softmax. The backward pass is a
`custom_vjp` that sends K, V and their partial gradients round the ring again, so
activation memory per device is proportional to the local block, never to the
full sequence.

Masks come from global positions and segment ids (0 = padding), through
kernels/attention_inputs.py's `visible` like every implementation's, so the kernel is
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
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from ul2x.kernels.attention_inputs import PositionBias, Tokens, visible
from ul2x.kernels.utils import vary_like


class BlockAttentionFn(Protocol):
  """A device's query block against one tile of keys/values, in float32.

  block_size: the most keys per tile; the ring streams key/value blocks in tiles of
    the largest divisor of the block length up to this.
  forward(q [b,q,h,d], k, v [b,k,h,d], q_tok, kv_tok, bias, acc, *, causal, scale)
    -> acc merged with these keys: acc = (out [b,q,h,d] float32, normalized over the
    keys seen so far, lse [b,h,q]), starting from zeros and -inf; rows with no
    visible key keep out = 0 and lse = -inf.
  backward(q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal, scale)
    -> grads + these keys' (dq, dk, dv, dparams), given the final lse and
    delta = sum(out * dout, -1), both [b,h,q]; `grads` are float32 accumulators
    (added to in place), dparams matches bias.params (None without a bias).
  """

  block_size: int

  def forward(self, q, k, v, q_tok, kv_tok, bias, acc, *, causal, scale): ...

  def backward(self, q, k, v, q_tok, kv_tok, bias, lse, delta, dout, grads, *, causal,
               scale): ...


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

  def forward(self, q, k, v, q_tok, kv_tok, bias, acc, *, causal, scale):
    lq, lk = q.shape[1], k.shape[1]
    tq, tk = _tile_size(lq, self.block_size), _tile_size(lk, self.block_size)

    def q_tile(i, acc):
      out, lse = acc
      qi, qtok = _slice((q, q_tok), i * tq, tq)
      out_i, lse_i = _slice(out, i * tq, tq), _slice(lse, i * tq, tq, axis=2)

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

      # The running state starts from the keys already seen: out_i with max lse_i and
      # denominator 1 is the same softmax as the unnormalized sums it came from.
      state = (out_i, lse_i, jnp.ones_like(lse_i))
      acc_i, m, l = lax.fori_loop(0, lk // tk, kv_tile, vary_like(state, q, k, bias))
      seen = jnp.isfinite(m)
      l = jnp.where(seen, l, 1.0)
      out = _update(out, acc_i / jnp.swapaxes(l, 1, 2)[..., None], i * tq)
      lse = _update(lse, jnp.where(seen, m + jnp.log(l), -jnp.inf), i * tq, axis=2)
      return out, lse

    return lax.fori_loop(0, lq // tq, q_tile, acc)

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
          return vary_like((zeros(qi), zeros(kj), zeros(vj), jax.tree.map(zeros, params)),
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


def _stream(static: _Static, state, fixed, moving, tile_fn):
  """One ring step over a key/value block, one key tile at a time.

  `fixed` and `moving` are tuples of [batch, block, ...] arrays (the block's keys,
  values, tokens and, in the backward pass, their gradients): those that stay on
  this device after the step and those that move on to the next device.
  `tile_fn(state, tile) -> (state, tile)` takes one tile of `fixed + moving` and
  returns it with its moving part updated. On a ring, tile j - 1 travels to the next
  device while tile j is computed, and the tile arriving from the previous device
  takes the slot of the one that left: the block is replaced in place, so a device
  holds one block and a few tiles in transit, never two blocks. Returns
  (state, moving)."""
  fixed, moving = tuple(fixed), tuple(moving)
  length = (fixed + moving)[0].shape[1]
  size = _tile_size(length, static.block_attention.block_size)
  n = _ring_size(static.axis_name)
  read = lambda moving, j: _slice(fixed + moving, j * size, size)
  write = lambda moving, tile, j: jax.tree.map(
      lambda x, t: _update(x, t, j * size), moving, tile)

  if n == 1 or not moving:
    def local(j, carry):
      state, done = tile_fn(carry[0], read(carry[1], j))
      return state, write(carry[1], done[len(fixed):], j)

    return lax.fori_loop(0, length // size, local, (state, moving))

  def pipelined(j, carry):
    state, moving, done = carry
    current = read(moving, j)
    arrived = _rotate(done, static.axis_name, n)
    # Writing tile j - 1 in place must wait until tile j has been read from the same
    # buffer. A select that is never taken (j >= 1) makes the write depend on that
    # read; without it XLA copies the whole block to keep the read safe.
    arrived = jax.tree.map(lambda a, c: jnp.where(j < 0, c, a), arrived,
                           current[len(fixed):])
    state, following = tile_fn(state, current)
    return state, write(moving, arrived, j - 1), following[len(fixed):]

  state, done = tile_fn(state, read(moving, 0))
  state, moving, done = lax.fori_loop(1, length // size, pipelined,
                                      (state, moving, done[len(fixed):]))
  return state, write(moving, _rotate(done, static.axis_name, n), length // size - 1)


def _ring_forward(static: _Static, q, k, v, q_tok, kv_tok, params):
  bias = _position_bias(static.bias_fn, params)

  def tile_fn(acc, tile):
    kt, vt, tok = tile
    return static.block_attention.forward(q, kt, vt, q_tok, tok, bias, acc,
                                          causal=static.causal, scale=static.scale), tile

  b, lq, h, d = q.shape
  acc = vary_like((jnp.zeros((b, lq, h, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf)),
                   q, k, params)
  n = _ring_size(static.axis_name)
  if n == 1:
    acc, _ = _stream(static, acc, (k, v, kv_tok), (), tile_fn)
  else:
    # n steps, not n - 1: the blocks travel all the way round and come home, and the
    # backward pass starts from these copies (the same values as k, v), which it may
    # overwrite, instead of copying k and v once more.
    step = lambda acc_block, _: (_stream(static, acc_block[0], (), acc_block[1], tile_fn),
                                 None)
    (acc, (k, v, kv_tok)), _ = lax.scan(step, (acc, (k, v, kv_tok)), length=n)
  out, lse = acc
  out = out.astype(q.dtype)
  return out, (q, k, v, q_tok, kv_tok, params, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(static: _Static, q, k, v, q_tok, kv_tok, params):
  return _ring_forward(static, q, k, v, q_tok, kv_tok, params)[0]


def _ring_backward(static: _Static, residuals, dout):
  q, k, v, q_tok, kv_tok, params, out, lse = residuals
  bias = _position_bias(static.bias_fn, params)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))

  def tile_fn(grads, tile):
    # Each key/value tile travels with the gradient accumulated for it so far; after n
    # steps that gradient is complete and back on the device that owns the tile.
    dq, dparams = grads
    kt, vt, tok, dk, dv = tile
    dq, dk, dv, dparams = static.block_attention.backward(
        q, kt, vt, q_tok, tok, bias, lse, delta, dout, (dq, dk, dv, dparams),
        causal=static.causal, scale=static.scale)
    return (dq, dparams), (kt, vt, tok, dk, dv)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  grads, dk, dv = vary_like(((zeros(q), jax.tree.map(zeros, params)), zeros(k), zeros(v)),
                             q, k)
  block = (k, v, kv_tok)
  n = _ring_size(static.axis_name)
  if n > 1:
    step = lambda carry, _: (_stream(static, carry[0], (), carry[1], tile_fn), None)
    (grads, (*block, dk, dv)), _ = lax.scan(step, (grads, (*block, dk, dv)), length=n - 1)
  (dq, dparams), (dk, dv) = _stream(static, grads, block, (dk, dv), tile_fn)
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
  params = None if bias is None else vary_like(bias.params, q, k)
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
