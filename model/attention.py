"""Attention: the reference dot-product implementation, the registry of implementations,
and the multi-head attention module.

Every implementation has the signature of `dot_product_attention`; masks are
given as segment ids (0 = padding) and positions, never as dense masks. `ring`
and `flash` take the relative bias as a `PositionBias` (table + bucket function)
instead of a dense tensor: see `stack_bias`.
"""

import logging
import math
from functools import cache, partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from ul2x.kernels import flash_attention as flash
from ul2x.kernels import ring_attention as ring
from ul2x.kernels.attention_inputs import Tokens, visible
from ul2x.model.layers import Dense, add_shared
from ul2x.model.position import T5BucketBias, apply_rope
from ul2x.partitioning import (constrain, current_split, logical_to_spec, mesh_axes,
                               mesh_platform)

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions,
                          kv_positions, causal=False, q_prefix=None, kv_prefix=None,
                          bias=None, scale=1.0, kv_heads_first=False):
  """Reference attention.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim], or
  [batch, heads, kv_len, head_dim] with `kv_heads_first` (a decoding cache's layout);
  segment ids / positions / prefix: [batch, len]; bias: [batch, heads, q_len, kv_len].
  Returns [batch, q_len, heads, head_dim] in q's dtype; softmax in float32.
  """
  kv = "bhkd" if kv_heads_first else "bkhd"
  logits = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = add_shared(logits, bias)
  mask = visible(Tokens(q_segment_ids, q_positions, q_prefix),
                 Tokens(kv_segment_ids, kv_positions, kv_prefix), causal)
  logits = jnp.where(mask[:, None], logits, _MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(f"bhqk,{kv}->bqhd", weights, v)


RING_BLOCK_SIZE = 512  # most tokens per tile of the blockwise computation in a ring step
_FLASH_PLATFORMS = ("gpu", "tpu")  # platforms with compiled flash kernels


def ring_dot_product_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions,
                               kv_positions, causal=False, q_prefix=None, kv_prefix=None,
                               bias=None, scale=1.0):
  """Ring attention (kernels/ring_attention.py) with the signature of
  `dot_product_attention`, but `bias` is a `PositionBias`. Under `axis_rules` it runs
  in a shard_map over the mesh: length split over the axis the rules give `length`
  (`sequence`), batch and heads as the rules shard them; outside, on one device. Each
  ring step's tiles run in the flash kernels on GPU and TPU (the mesh's platform), in
  plain JAX elsewhere (`_ring_blocks`)."""
  mesh, rules, axis, n = current_split("length")
  platform = mesh_platform(mesh)
  for what, length in (("query", q.shape[1]), ("key/value", k.shape[1])):
    if length % n:
      raise ValueError(
          f"attention='ring' splits the {what} length {length} over the {n} devices of "
          f"mesh axis {axis!r}; make the length a multiple of {n}.")
  local = q.shape[1] // n  # causal: tiles of half a block align with the zigzag chunks
  block = min(RING_BLOCK_SIZE, local // 2 if causal and local % 2 == 0 else local)
  q_tok = Tokens(q_segment_ids, q_positions, q_prefix)
  kv_tok = Tokens(kv_segment_ids, kv_positions, kv_prefix)

  def attend(q, k, v, q_tok, kv_tok, bias):
    return ring.ring_attention(
        q, k, v, q_segment_ids=q_tok.segment_ids, kv_segment_ids=kv_tok.segment_ids,
        q_positions=q_tok.positions, kv_positions=kv_tok.positions, causal=causal,
        q_prefix=q_tok.prefix, kv_prefix=kv_tok.prefix, bias=bias, scale=scale,
        axis_name=axis, block_attention=_ring_blocks(block, bias, platform, q.shape[-1]))

  if mesh is None:
    return attend(q, k, v, q_tok, kv_tok, bias)
  names = ("batch", "length", "heads", "kv")
  q_spec, kv_spec = ((*logical_to_spec(names, rules, dict(mesh.shape), x.shape), None, None,
                      None, None)[:4] for x in (q, k))
  if q_spec[1] != axis or kv_spec[1] != axis:
    raise ValueError(f"attention='ring' needs the length split over {axis!r} alone, but "
                     f"the rules give q {q_spec} and k/v {kv_spec}; fix the axis rules.")
  per_token = lambda tok, spec: jax.tree.map(lambda _: PartitionSpec(*spec[:2]), tok)
  in_specs = (PartitionSpec(*q_spec), PartitionSpec(*kv_spec), PartitionSpec(*kv_spec),
              per_token(q_tok, q_spec), per_token(kv_tok, kv_spec),
              jax.tree.map(lambda _: PartitionSpec(q_spec[2]), bias))
  sharded = jax.shard_map(attend, mesh=mesh, in_specs=in_specs,
                          out_specs=PartitionSpec(*q_spec))
  return sharded(q, k, v, q_tok, kv_tok, bias)


def _ring_blocks(block: int, bias, platform: str, head_dim: int):
  """The ring's `BlockAttentionFn`: the compiled flash kernels on a platform that has
  them (no bias, or the T5 bucket bias they compute per tile; on GPU a power-of-two
  head_dim >= 16), else plain-JAX tiles."""
  if (platform in _FLASH_PLATFORMS and flash.supports_head_dim(platform, head_dim)
      and (bias is None or isinstance(bias.fn, T5BucketBias))):
    return flash.FlashBlockAttention(block, None if bias is None else _bucket_fn(bias.fn),
                                     interpret=False, platform=platform)
  return ring.BlockwiseAttention(block)


def ring_layout(cfg, length: int):
  """(to_layout, from_layout) of the length axis (dim 1) of a causal stack's
  per-token arrays: the zigzag of kernels/ring_attention.py over the ring, so every
  device does the same causal work, with `attention='ring'` and `ring_load_balance`
  on a mesh; the identity otherwise."""
  n = current_split("length")[3] if cfg.attention == "ring" and cfg.ring_load_balance else 1
  if n == 1:
    return (lambda x: x), (lambda x: x)
  if cfg.num_experts:
    raise ValueError(
        "ring_load_balance=True puts a causal stack's tokens in zigzag order, but MoE "
        "token-choice routing fills expert capacity in array order, which must be position "
        "order to stay causal; set TransformerConfig.ring_load_balance=False with "
        f"num_experts={cfg.num_experts}.")
  if length % (2 * n):
    raise ValueError(
        f"attention='ring' with ring_load_balance=True needs the length {length} to be a "
        f"multiple of 2 x {n} (the ring size) = {2 * n}; pad the length to a multiple of "
        f"{2 * n} or set TransformerConfig.ring_load_balance=False.")
  return partial(ring.zigzag, num_shards=n), partial(ring.unzigzag, num_shards=n)


@cache
def _bucket_fn(fn):
  """The bucket function of a `T5BucketBias`, one object per settings (jit caches on it)."""
  if not isinstance(fn, T5BucketBias):
    raise ValueError(f"attention='flash' computes the T5 relative bias (T5BucketBias) inside "
                     f"the kernel; it cannot compute {fn!r}. Use attention='reference'.")
  return fn.buckets


@cache
def _log_flash_fallback(backend: str):
  logging.warning("attention='flash' has no compiled kernel on %r: using the reference "
                  "dot_product_attention with a dense bias instead.", backend)


def flash_dot_product_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions,
                                kv_positions, causal=False, q_prefix=None, kv_prefix=None,
                                bias=None, scale=1.0, interpret: bool | None = None):
  """The Pallas flash kernel (kernels/flash_attention.py) with the signature of
  `dot_product_attention`, but `bias` is a `PositionBias` of the T5 relative bias,
  computed per tile. The platform is the mesh's devices' (so a dry run for a TPU
  topology compiles the TPU kernel), else the default backend's. On a platform without
  a compiled kernel (not in `_FLASH_PLATFORMS`) it logs once and uses the reference;
  `interpret=True` runs the kernel in Pallas interpret mode instead, on any platform
  (for tests). Under `axis_rules` it runs in a shard_map over the mesh: batch and heads
  split as the rules shard q (k/v heads and the bias table alike), whole sequences per
  device; outside, on whole arrays."""
  mesh, rules, axis, _ = current_split("length")
  platform = mesh_platform(mesh)
  if not interpret and platform not in _FLASH_PLATFORMS:
    _log_flash_fallback(platform)
    dense = None if bias is None else bias(q_positions, kv_positions)
    return dot_product_attention(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, causal=causal,
        q_prefix=q_prefix, kv_prefix=kv_prefix, bias=dense, scale=scale)
  q_tok = Tokens(q_segment_ids, q_positions, q_prefix)
  kv_tok = Tokens(kv_segment_ids, kv_positions, kv_prefix)
  bucket_fn = None if bias is None else _bucket_fn(bias.fn)

  def attend(q, k, v, q_tok, kv_tok, bias):
    return flash.flash_attention(
        q, k, v, q_segment_ids=q_tok.segment_ids, kv_segment_ids=kv_tok.segment_ids,
        q_positions=q_tok.positions, kv_positions=kv_tok.positions, causal=causal,
        q_prefix=q_tok.prefix, kv_prefix=kv_tok.prefix, scale=scale,
        bias_table=None if bias is None else bias.params, bucket_fn=bucket_fn,
        interpret=bool(interpret), platform=platform if platform in _FLASH_PLATFORMS else None)

  if mesh is None:
    return attend(q, k, v, q_tok, kv_tok, bias)
  if axis is not None:
    raise ValueError(f"attention='flash' needs whole sequences per device, but the rules "
                     f"split length over {axis!r}; use attention='ring' for sequence sharding.")
  names = ("batch", "length", "heads", "kv")
  q_spec = (*logical_to_spec(names, rules, dict(mesh.shape), q.shape), None, None, None)
  batch, heads = q_spec[0], q_spec[2]
  shards = math.prod(mesh.shape[a] for a in mesh_axes(heads))
  if k.shape[2] % shards:
    raise ValueError(
        f"attention='flash' splits the {q.shape[2]} query heads over {heads!r} ({shards} "
        f"devices) as the rules give, but the {k.shape[2]} key/value heads are not a "
        f"multiple of {shards}; use a multiple of {shards} key/value heads or fix the rules.")
  spec = PartitionSpec(batch, None, heads)
  per_token = lambda tok: jax.tree.map(lambda _: PartitionSpec(batch), tok)
  in_specs = (spec, spec, spec, per_token(q_tok), per_token(kv_tok),
              jax.tree.map(lambda _: PartitionSpec(heads), bias))
  # check_vma=False in interpret mode: jax 0.10's Pallas interpreter loses varying axes.
  sharded = jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=spec,
                          check_vma=not interpret)
  return sharded(q, k, v, q_tok, kv_tok, bias)


def stack_bias(relative_bias, positions, attention: str):
  """A stack's relative position bias: the dense [1, heads, len, len] tensor,
  or for `ring` and `flash` the `PositionBias` (table + bucket function) computed
  per block."""
  if attention in ("ring", "flash"):
    return relative_bias.blockwise()
  # Packed positions count from 0 in each segment, so within a segment they differ from
  # 0..len-1 by a constant, and the mask hides pairs across segments: the bias of
  # 0..len-1, one [1, heads, len, len] tensor for the whole batch as T5X computes it,
  # equals the bias of the positions wherever attention looks, for a batch-th of the
  # gather (and of its gradient's scatter).
  offsets = jnp.arange(positions.shape[1], dtype=jnp.int32)[None]
  return relative_bias(offsets, offsets)


ATTENTION_FNS = {"reference": dot_product_attention, "ring": ring_dot_product_attention,
                 "flash": flash_dot_product_attention}


def get_attention_fn(name: str):
  if name not in ATTENTION_FNS:
    raise ValueError(f"attention={name!r} is unknown; choose one of {sorted(ATTENTION_FNS)}.")
  return ATTENTION_FNS[name]


class MultiHeadAttention(nnx.Module):
  """Projections around an attention function. T5 convention: no 1/sqrt(d) in the
  logits; the query projection's initialisation carries that scale instead."""

  def __init__(self, cfg, *, causal: bool, rngs: nnx.Rngs):
    dt = cfg.activation_dtype
    e, h, d = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    self.query = Dense([e], [h, d], ("embed", "heads", "kv"), dtype=dt, rngs=rngs,
                       init_scale=1.0 / d, distribution="normal")
    self.key = Dense([e], [h, d], ("embed", "heads", "kv"), dtype=dt, rngs=rngs,
                     distribution="normal")
    self.value = Dense([e], [h, d], ("embed", "heads", "kv"), dtype=dt, rngs=rngs,
                       distribution="normal")
    self.out = Dense([h, d], [e], ("heads", "kv", "embed"), dtype=dt, rngs=rngs,
                     distribution="normal")
    self.causal = causal
    self.rope = cfg.rope_max_wavelength if cfg.position == "rope" else None
    self.attention_fn = get_attention_fn(cfg.attention)

  def project_kv(self, x_kv, kv_positions):
    """x_kv: [batch, kv_len, embed] -> keys and values [batch, kv_len, heads, head_dim]
    (RoPE applied to the keys), as attention takes them and as a decoding cache holds them."""
    names = ("batch", "length", "heads", "kv")
    k = constrain(self.key(x_kv), names)
    v = constrain(self.value(x_kv), names)
    if self.rope is not None:
      k = apply_rope(k, kv_positions, self.rope)
    return k, v

  def __call__(self, x_q, x_kv, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
               q_prefix=None, kv_prefix=None, bias=None, kv=None):
    """x_q: [batch, q_len, embed], x_kv: [batch, kv_len, embed] -> [batch, q_len, embed].

    kv: (keys, values) [batch, heads, kv_len, head_dim] from a decoding cache instead
    of projecting `x_kv` (None then); cached keys and values are attended with the
    reference implementation, whatever `cfg.attention` names (decoding attends one new
    token per row to the cache).
    """
    names = ("batch", "length", "heads", "kv")
    q = constrain(self.query(x_q), names)
    if self.rope is not None:
      q = apply_rope(q, q_positions, self.rope)
    if kv is None:
      k, v = self.project_kv(x_kv, kv_positions)
      attention_fn = self.attention_fn
    else:
      (k, v), attention_fn = kv, partial(dot_product_attention, kv_heads_first=True)
    out = attention_fn(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, causal=self.causal,
        q_prefix=q_prefix, kv_prefix=kv_prefix, bias=bias)
    return self.out(constrain(out, names))
