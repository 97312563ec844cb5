"""Basic NNX layers with logical axis names: dense, embedding, RMSNorm, gated MLP, dropout."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.partitioning import constrain


def variance_scaling_init(scale: float, distribution: str = "normal"):
  """Fan-in variance scaling for a kernel whose first `n_in` dims are inputs."""

  def init(key, shape, n_in, dtype=jnp.float32):
    fan_in = math.prod(shape[:n_in])
    std = math.sqrt(scale / fan_in)
    if distribution == "truncated_normal":
      # 0.8796 is the std of a unit normal truncated to [-2, 2].
      return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std / 0.87962566
    return jax.random.normal(key, shape, dtype) * std

  return init


def dropout(x, rate: float, key):
  """Inverted dropout; `key=None` or `rate=0` means deterministic."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dense(nnx.Module):
  """x[..., *in_shape] @ kernel[*in_shape, *out_shape] -> [..., *out_shape], no bias."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: tuple,
               *, dtype, rngs: nnx.Rngs, init_scale: float = 1.0,
               distribution: str = "truncated_normal"):
    self.n_in = len(in_shape)
    shape = tuple(in_shape) + tuple(out_shape)
    init = variance_scaling_init(init_scale, distribution)
    self.kernel = nnx.Param(init(rngs.params(), shape, self.n_in), axes=tuple(axes))
    self.dtype = dtype

  def __call__(self, x):
    kernel = self.kernel[...].astype(self.dtype)
    return jnp.tensordot(x.astype(self.dtype), kernel, axes=self.n_in)


class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` gives tied output logits."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
    table = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)
    self.embedding = nnx.Param(table, axes=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids):
    """ids: [batch, length] int -> [batch, length, embed]."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """x: [batch, length, embed] -> float32 logits [batch, length, vocab]."""
    return jnp.dot(x.astype(jnp.float32), self.embedding[...].T)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (T5 LayerNorm: no mean subtraction, no bias)."""

  def __init__(self, dim: int, *, dtype, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("embed",))
    self.dtype = dtype
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(self.dtype)


class GatedMLP(nnx.Module):
  """T5 v1.1 gated MLP: wo(act(wi_0 x) * wi_1 x), activation gelu or silu."""

  def __init__(self, emb_dim: int, mlp_dim: int, activation: str, dropout_rate: float,
               *, dtype, rngs: nnx.Rngs):
    self.wi_0 = Dense([emb_dim], [mlp_dim], ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wi_1 = Dense([emb_dim], [mlp_dim], ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.wo = Dense([mlp_dim], [emb_dim], ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.activation = activation
    self.dropout_rate = dropout_rate

  def __call__(self, x, key=None):
    """x: [batch, length, embed] -> [batch, length, embed]."""
    act = jax.nn.gelu if self.activation == "gelu" else jax.nn.silu
    h = act(self.wi_0(x)) * self.wi_1(x)
    h = constrain(h, ("batch", "length", "mlp"))
    h = dropout(h, self.dropout_rate, key)
    return self.wo(h)
