"""Sparse upcycling (Komatsuzaki et al., 2022) as a restore-time transform: a fresh MoE
run's params from the latest checkpoint of its dense twin (like T5X's
`state_transformation_fns`, applied to what `trainer/checkpoints.py` finds)."""

import jax
import jax.numpy as jnp

from ul2x.trainer import checkpoints
from ul2x.trainer.console import say


def restore_upcycled_params(path: str, params: dict, shardings, cfg) -> dict:
  """MoE params (placed by `shardings`) from the latest dense checkpoint under `path` (a
  MODEL_DIR or its checkpoints/); `params` are the MoE model's freshly initialised ones."""
  upcycle = jax.jit(lambda dense, moe: upcycle_dense_params(dense, moe, cfg),
                    out_shardings=shardings)
  return upcycle(_dense_params(path), params)


def _dense_params(path: str) -> dict:
  """Params of the latest checkpoint under `path`: a MODEL_DIR or its checkpoints/, all
  that it stores, read by `checkpoints.restore` (so a damaged checkpoint is refused in
  one line); `upcycle_dense_params` then checks them against the MoE model."""
  try:
    directory, step = checkpoints.find_checkpoint(path)
  except ValueError as e:
    raise ValueError(f"train.init_from_dense_checkpoint={e}") from None
  abstract = {"params": checkpoints.stored_params(directory, step)}
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state, _ = checkpoints.restore(directory, step, abstract,
                                 jax.tree.map(lambda _: one_device, abstract))
  say(f"upcycling the dense checkpoint {directory} at step {step}")
  return jax.device_get(state["params"])  # host arrays: placed by the caller's jit


def upcycle_dense_params(dense: dict, moe: dict, cfg) -> dict:
  """Sparse upcycling (Komatsuzaki et al., 2022): MoE params from a dense model's.

  dense: pure-dict params of a dense model with the sizes of `cfg` (listed or
  scanned layers; string keys, as restored from a checkpoint, are fine). moe:
  the MoE model's freshly initialised params, whose routers are kept. Every
  expert of an MoE layer starts as a copy of that layer's dense MLP, so
  `cfg.expert_mlp_dim` must equal the dense `mlp_dim`; all else is copied.
  """
  dense = _int_keys(dense)
  out = {}
  for name, template in moe.items():
    if name not in dense:
      raise ValueError(f"upcycling: the dense params have no {name!r}; they must come from "
                       "the dense twin of the MoE model (same architecture and sizes).")
    if isinstance(template, dict) and set(template) == {"layers"}:
      out[name] = {"layers": _upcycle_stack(dense[name]["layers"], template["layers"], cfg,
                                            name)}
    else:
      out[name] = _copy(dense[name], template, name)
  return out


def _int_keys(tree):
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
          for k, v in tree.items()}


def _copy(dense, template, path: str):
  if isinstance(template, dict):
    if not isinstance(dense, dict) or set(template) - set(dense):
      missing = sorted(set(template) - set(dense or {}), key=str)
      raise ValueError(f"upcycling: the dense params lack {path}/{missing}; they must come "
                       "from the dense twin of the MoE model.")
    return {k: _copy(dense[k], v, f"{path}/{k}") for k, v in template.items()}
  if tuple(dense.shape) != tuple(template.shape):
    raise ValueError(f"upcycling: dense parameter {path} has shape {tuple(dense.shape)} but "
                     f"the MoE model needs {tuple(template.shape)}; use the same sizes.")
  return jnp.asarray(dense).astype(template.dtype)


def _upcycle_layer(dense: dict, template: dict, path: str) -> dict:
  if "experts" not in template["mlp"]:
    return _copy(dense, template, path)
  out = {k: _copy(dense[k], v, f"{path}/{k}") for k, v in template.items() if k != "mlp"}
  experts = {}
  for name, target in template["mlp"]["experts"].items():
    kernel = jnp.asarray(dense["mlp"][name]["kernel"])
    if kernel.shape != target.shape[1:]:
      raise ValueError(
          f"upcycling: dense {path}/mlp/{name}/kernel has shape {kernel.shape} but each "
          f"expert needs {target.shape[1:]}; set --gin.TransformerConfig.expert_mlp_dim to "
          "the dense mlp_dim.")
    experts[name] = jnp.broadcast_to(kernel, target.shape).astype(target.dtype)
  out["mlp"] = {"router": template["mlp"]["router"], "experts": experts}
  return out


def _upcycle_stack(dense_layers: dict, template: dict, cfg, name: str) -> dict:
  """Dense stack (listed or scanned) -> MoE stack of blocks (listed or scanned)."""
  if all(isinstance(k, int) for k in dense_layers):
    dense = [dense_layers[i] for i in range(len(dense_layers))]
  else:
    count = jax.tree.leaves(dense_layers)[0].shape[0]
    dense = [jax.tree.map(lambda a, i=i: a[i], dense_layers) for i in range(count)]
  k = cfg.moe_layer_interval
  scanned = "sublayers" in template
  blocks = jax.tree.leaves(template)[0].shape[0] if scanned else len(template)
  if len(dense) != blocks * k:
    raise ValueError(f"upcycling: the dense {name} has {len(dense)} layers but the MoE model "
                     f"has {blocks * k}; use the same depth.")

  def layer(b, j):
    if scanned:
      return _upcycle_layer(dense[b * k + j],
                            jax.tree.map(lambda a: a[b], template["sublayers"][j]),
                            f"{name}/layers/{b * k + j}")
    return _upcycle_layer(dense[b * k + j], template[b]["sublayers"][j],
                          f"{name}/layers/{b * k + j}")

  new = [[layer(b, j) for j in range(k)] for b in range(blocks)]
  if scanned:
    return {"sublayers": {j: jax.tree.map(lambda *xs: jnp.stack(xs), *[n[j] for n in new])
                          for j in range(k)}}
  return {b: {"sublayers": dict(enumerate(new[b]))} for b in range(blocks)}
