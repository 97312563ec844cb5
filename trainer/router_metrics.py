"""The trainer's MoE router losses and metrics: what the model's MoE layers sowed in a
forward pass, popped and aggregated per layer stack (docs/moe.md#metrics)."""

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.model.moe import HISTOGRAM_BINS

_LOSSES = ("aux_loss", "router_z_loss")
_VECTORS = ("tokens_per_expert", "experts_per_token")


def pop_router_metrics(model: nnx.Module) -> dict:
  """Pops what the MoE layers of `model` sowed in its last call and aggregates it per
  layer stack (the top-level module, e.g. 'encoder'): losses summed over the stack's
  MoE layers, everything else averaged over them.

  -> {} for a dense model, else: 'moe/aux_loss' and 'moe/router_z_loss' (sums over
  all MoE layers: the terms the train step weights into the objective),
  'moe/unrouted_fraction' (mean over all MoE layers), and per stack
  'moe/<stack>/<name>' scalars plus the vector 'moe/<stack>/tokens_per_expert' [E].
  """
  sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
  layers: dict[str, dict[str, list]] = {}
  for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if "router_stats" not in keys:
      continue
    name = keys[-1]
    base = value.shape[value.ndim - (1 if name in _VECTORS else 0):]
    stack = layers.setdefault(str(keys[0]), {})
    stack.setdefault(name, []).append(value.reshape(-1, *base))
  if not layers:
    return {}
  out = {"moe/aux_loss": jnp.zeros((), jnp.float32),
         "moe/router_z_loss": jnp.zeros((), jnp.float32)}
  unrouted = []
  for stack, values in layers.items():
    for name, parts in values.items():
      stacked = jnp.concatenate(parts)
      reduced = jnp.sum(stacked, 0) if name in _LOSSES else jnp.mean(stacked, 0)
      if name == "experts_per_token":
        for i in range(HISTOGRAM_BINS):
          label = f"{i}+" if i == HISTOGRAM_BINS - 1 else str(i)
          out[f"moe/{stack}/experts_per_token/{label}"] = reduced[i]
      else:
        out[f"moe/{stack}/{name}"] = reduced
      if name in _LOSSES:
        out[f"moe/{name}"] += reduced
      if name == "unrouted_fraction":
        unrouted.append(stacked)
  out["moe/unrouted_fraction"] = jnp.mean(jnp.concatenate(unrouted))
  return out
