"""Dropless mixture-of-experts dispatch: token choices sorted by expert, run through the
experts as grouped matmuls (`jax.lax.ragged_dot`), and combined back, as per-shard array
functions.

A token's k choices are given as `expert` [T, k] (the index of a local expert, or any
value outside [0, num_experts) for an expert this shard does not hold, or none) and
`weight` [T, k] (that expert's weight in the token's output). Choice j of token t is
row t * k + j of the flattened choices. No capacity: every choice of a local expert is
computed, however many go to one expert.

`grouped_matmul` here is the reference twin of the Pallas grouped matmuls
(kernels/grouped_matmul_pallas.py, kernels/grouped_matmul_tpu.py); model/moe.py's
`select_grouped_matmul` picks one of them by `moe_matmul` and platform.
"""

import jax
import jax.numpy as jnp


def sort_by_expert(expert, num_experts: int):
  """expert: [T, k] int -> (order [T*k] int32, group_sizes [num_experts] int32).

  `order` lists the flattened choices grouped by expert (token order within an expert),
  choices of no local expert last; `group_sizes[e]` counts the choices of expert e."""
  flat = expert.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  if n * (num_experts + 1) >= 2 ** 31:
    raise ValueError(f"{n} expert choices x {num_experts + 1} do not fit the int32 sort keys; "
                     "use fewer tokens per device or fewer experts per shard.")
  key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  # One sort of unique keys rather than argsort: jax's sort types each output with its own
  # operand's shard_map variance, so argsort's indices (a sorted iota) would count as equal
  # on every device inside shard_map and their gradients would be summed across devices.
  order = jax.lax.sort(key * n + jnp.arange(n, dtype=jnp.int32)) % n
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[key].add(1, mode="drop")
  return order, group_sizes


def dispatch_sorted(x, order, k: int):
  """x: [T, D]; order: [T*k] -> [T*k, D]: row i is the token of choice order[i]."""
  return jnp.take(x, order // k, axis=0)


def grouped_matmul(x, w, group_sizes):
  """x: [M, K] rows sorted by group; w: [G, K, N]; group_sizes: [G] -> [M, N].

  Row i of x is multiplied by w[g] for the group g it falls in; rows past
  sum(group_sizes) (choices of no local expert) give zeros. `jax.lax.ragged_dot`
  leaves those rows unspecified on some backends, hence the explicit mask."""
  y = jax.lax.ragged_dot(x, w, group_sizes)
  rows = jnp.arange(x.shape[0], dtype=group_sizes.dtype)
  return jnp.where((rows < jnp.sum(group_sizes))[:, None], y, jnp.zeros((), y.dtype))


def combine_sorted(y, order, weight):
  """y: [T*k, D] outputs in sorted order; order: [T*k]; weight: [T, k]
  -> [T, D]: per token, the weighted sum of its choices' outputs."""
  t, k = weight.shape
  unsorted = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
  return jnp.einsum("tkd,tk->td", unsorted.reshape(t, k, -1), weight.astype(y.dtype))
