"""Capacity-bounded mixture-of-experts dispatch and combine as per-shard array functions.

A routing decision is given per group of S tokens as expert slots: for group g,
expert e and slot c < capacity C, `slot_token[g, e, c]` is the index (in the
group) of the token in that slot, `slot_valid` says whether the slot is used and
`slot_weight` is the weight of that expert's output in the token's combined
output (0 for unused slots).

Two twins compute the same thing: `dispatch`/`combine` gather and scatter-add
(memory O(G*E*C*D)), and `dispatch_one_hot`/`combine_one_hot`, the plain
reference that multiplies by a dense one-hot [G, E, C, S] tensor.
`to_experts`/`from_experts` move slots to the devices holding their experts and
back with an all-to-all; call them inside the caller's `shard_map`.
"""

import jax
import jax.numpy as jnp


def dispatch(x, slot_token, slot_valid):
  """x: [G, S, D]; slot_token: [G, E, C] int; slot_valid: [G, E, C] bool
  -> [G, E, C, D]: each slot holds its token (zeros in unused slots)."""
  g, e, c = slot_token.shape
  gathered = jax.vmap(lambda xs, idx: jnp.take(xs, idx, axis=0))(
      x, slot_token.reshape(g, e * c))
  gathered = gathered.reshape(g, e, c, x.shape[-1])
  return jnp.where(slot_valid[..., None], gathered, jnp.zeros((), x.dtype))


def combine(expert_out, slot_token, slot_weight, group_size: int):
  """expert_out: [G, E, C, D]; slot_token: [G, E, C] int; slot_weight: [G, E, C]
  -> [G, group_size, D]: per token, the weighted sum of its slots' outputs."""
  g, e, c, d = expert_out.shape
  weighted = expert_out * slot_weight[..., None].astype(expert_out.dtype)

  def scatter(values, idx):
    return jnp.zeros((group_size, d), values.dtype).at[idx].add(values)

  return jax.vmap(scatter)(weighted.reshape(g, e * c, d), slot_token.reshape(g, e * c))


def dispatch_one_hot(x, slot_token, slot_valid):
  """Reference twin of `dispatch` through a dense [G, E, C, S] one-hot tensor."""
  mask = jax.nn.one_hot(slot_token, x.shape[1], dtype=x.dtype)
  mask = mask * slot_valid[..., None].astype(x.dtype)
  return jnp.einsum("gecs,gsd->gecd", mask, x)


def combine_one_hot(expert_out, slot_token, slot_weight, group_size: int):
  """Reference twin of `combine` through a dense [G, E, C, S] one-hot tensor."""
  mask = jax.nn.one_hot(slot_token, group_size, dtype=expert_out.dtype)
  mask = mask * slot_weight[..., None].astype(expert_out.dtype)
  return jnp.einsum("gecs,gecd->gsd", mask, expert_out)


DISPATCH_FNS = {"gather": (dispatch, combine), "one_hot": (dispatch_one_hot, combine_one_hot)}


def to_experts(slots, axis_name):
  """Inside shard_map over `axis_name` (n devices holding E/n experts each):
  [G, E, C, D] slots of this device's groups -> [n*G, E/n, C, D], the slots of
  this device's experts from every device's groups (source device major)."""
  return jax.lax.all_to_all(slots, axis_name, split_axis=1, concat_axis=0, tiled=True)


def from_experts(slots, axis_name):
  """Inverse of `to_experts`: [n*G, E/n, C, D] -> [G, E, C, D]."""
  return jax.lax.all_to_all(slots, axis_name, split_axis=0, concat_axis=1, tiled=True)
