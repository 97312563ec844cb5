"""Attention: the reference dot-product implementation, the registry of implementations,
and the multi-head attention module.

Every implementation has the signature of `dot_product_attention`; masks are
given as segment ids (0 = padding) and positions, never as dense masks.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.model.layers import Dense
from ul2x.model.position import apply_rope
from ul2x.partitioning import constrain

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                   causal: bool, q_prefix=None, kv_prefix=None):
  """Boolean [batch, 1, q_len, kv_len]: same non-padding segment and, if causal,
  key position <= query position unless both tokens are in the bidirectional prefix."""
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
      kv_segment_ids[:, None, :] != 0)
  if causal:
    allowed = kv_positions[:, None, :] <= q_positions[:, :, None]
    if q_prefix is not None:
      allowed |= q_prefix[:, :, None].astype(bool) & kv_prefix[:, None, :].astype(bool)
    mask &= allowed
  return mask[:, None]


def dot_product_attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_positions,
                          kv_positions, causal=False, q_prefix=None, kv_prefix=None,
                          bias=None, scale=1.0):
  """Reference attention.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim];
  segment ids / positions / prefix: [batch, len]; bias: [batch, heads, q_len, kv_len].
  Returns [batch, q_len, heads, head_dim] in q's dtype; softmax in float32.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits += bias
  mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal,
                        q_prefix, kv_prefix)
  logits = jnp.where(mask, logits, _MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


ATTENTION_FNS = {"reference": dot_product_attention}


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

  def __call__(self, x_q, x_kv, *, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
               q_prefix=None, kv_prefix=None, bias=None):
    """x_q: [batch, q_len, embed], x_kv: [batch, kv_len, embed] -> [batch, q_len, embed]."""
    names = ("batch", "length", "heads", "kv")
    q = constrain(self.query(x_q), names)
    k = constrain(self.key(x_kv), names)
    v = constrain(self.value(x_kv), names)
    if self.rope is not None:
      q = apply_rope(q, q_positions, self.rope)
      k = apply_rope(k, kv_positions, self.rope)
    out = self.attention_fn(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, causal=self.causal,
        q_prefix=q_prefix, kv_prefix=kv_prefix, bias=bias)
    return self.out(constrain(out, names))
