"""Basic NNX layers with logical axis names: dense, embedding, RMSNorm, gated MLP, dropout;
the activation table and the dropout-key split the model's modules share."""

import math
from functools import partial
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.partitioning import constrain, current_axis_rules, current_split, mesh_platform

# The gated MLPs' activations by `TransformerConfig.activation` (jax's gelu: tanh approximation).
ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu}


def split_key(key, n: int) -> list:
  """`n` dropout keys from `key`; `key=None` (deterministic) gives `n` Nones."""
  return [None] * n if key is None else list(jax.random.split(key, n))


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
    return contract(x.astype(self.dtype), kernel, self.n_in)


def _contract(x, kernel, n_in: int):
  return jnp.tensordot(x, kernel, axes=n_in)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract_cpu(x, kernel, n_in: int):
  return _contract(x, kernel, n_in)


def _contract_cpu_fwd(x, kernel, n_in):
  return _contract(x, kernel, n_in), (x, kernel)


def _contract_cpu_bwd(n_in, res, g):
  """The kernel's gradient x^T g transposes the narrower of x [tokens, in] and
  g [tokens, out] as an op of its own. Left to itself, XLA:CPU transposes an operand
  inside the fusion that computes it, with strided writes that cost more than the
  matmul (docs/benchmarks.md, "Against PyTorch")."""
  x, kernel = res
  n_out = kernel.ndim - n_in
  x2 = x.reshape(-1, math.prod(kernel.shape[:n_in]))
  g2 = g.reshape(-1, math.prod(kernel.shape[n_in:]))
  transposed = jax.lax.optimization_barrier
  if x2.shape[1] <= g2.shape[1]:
    dk = jnp.dot(transposed(x2.T), g2)
  else:
    dk = jnp.dot(transposed(g2.T), x2).T
  dk = dk.reshape(kernel.shape)
  out_dims = tuple(range(g.ndim - n_out, g.ndim))
  dx = jnp.tensordot(g, kernel, axes=(out_dims, tuple(range(n_in, kernel.ndim))))
  return dx, dk


_contract_cpu.defvjp(_contract_cpu_fwd, _contract_cpu_bwd)


def contract(x, kernel, n_in: int):
  """x[..., *in] . kernel[*in, *out] -> [..., *out] (a dense layer's matmul)."""
  if _compiles_for_cpu():
    return _contract_cpu(x, kernel, n_in)
  return _contract(x, kernel, n_in)


def _sum_batch(g):
  """g [b, ...] summed over its leading axis by halving, keeping it as 1: adds of
  contiguous halves, where XLA:CPU's YNNPACK reduction over a leading axis reads
  strided (docs/benchmarks.md, "Against PyTorch")."""
  while g.shape[0] > 1:
    half = g.shape[0] // 2
    summed = g[:half] + g[half:2 * half]
    g = summed.at[:1].add(g[2 * half:]) if g.shape[0] % 2 else summed
  return g


@jax.custom_vjp
def _add_shared_cpu(x, y):
  return x + y


def _add_shared_cpu_fwd(x, y):
  return x + y, None


def _add_shared_cpu_bwd(_, g):
  return g, _sum_batch(g)


_add_shared_cpu.defvjp(_add_shared_cpu_fwd, _add_shared_cpu_bwd)


def _compiles_for_cpu() -> bool:
  """Whether the computation being traced is for CPU: the active mesh's platform
  (a compile-only TPU or GPU mesh is not), else the default backend."""
  context = current_axis_rules()
  return mesh_platform(context[0] if context else None) == "cpu"


def add_shared(x, y):
  """x + y for y shared by the batch, [1, *x.shape[1:]] (the relative position bias
  added to every example's logits). On CPU, with the batch on one device, y's gradient
  is summed over the batch by `_sum_batch`; otherwise, and for other shapes or dtypes,
  this is x + y (halving a split batch would move its halves between devices)."""
  if (x.ndim == y.ndim and y.shape[0] == 1 and y.shape[1:] == x.shape[1:]
      and x.dtype == y.dtype and _compiles_for_cpu() and current_split("batch")[3] == 1):
    return _add_shared_cpu(x, y)
  return x + y


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


# RMSNorm's epsilon: fixed (no config field), so exported configs state it and imported
# ones must match it (export/mappings.py).
NORM_EPS = 1e-6


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (T5 LayerNorm: no mean subtraction, no bias)."""

  def __init__(self, dim: int, *, dtype, eps: float = NORM_EPS):
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
    h = ACTIVATIONS[self.activation](self.wi_0(x)) * self.wi_1(x)
    h = constrain(h, ("batch", "length", "mlp"))
    h = dropout(h, self.dropout_rate, key)
    return self.wo(h)
