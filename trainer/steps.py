"""The pure train and eval step functions (jitted by `trainer.setup.Setup`)."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ul2x import partitioning
from ul2x.model.contract import LOSS_WEIGHTS, loss_sums
from ul2x.model.losses import SUM_KEYS
from ul2x.trainer.router_metrics import pop_router_metrics


def _sums(graphdef, params, batch, key, z_loss):
  """-> (token sums, MoE router losses and metrics: {} for a dense model)."""
  model = nnx.merge(graphdef, params)
  logits = model(batch, dropout_key=key)
  sums = loss_sums(logits, batch, z_loss)
  return sums, pop_router_metrics(model)


def summarize(sums: dict) -> dict:
  """Per-token means from token sums."""
  w = jnp.maximum(sums["weight"], 1.0)
  return {"loss": sums["loss"] / w, "cross_entropy": sums["cross_entropy"] / w,
          "z_loss": sums["z_loss"] / w, "accuracy": sums["correct"] / w,
          "target_tokens": sums["weight"]}


def _microbatches(batch, n: int):
  """[b, ...] -> [n, b/n, ...]; microbatch i takes rows i, i+n, ... so every
  data shard contributes equally to each microbatch."""
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def _all_finite(tree):
  """True when every floating-point value of `tree` is finite (one reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def make_train_step(graphdef, tx, schedule, *, mesh, rules, num_microbatches: int = 1,
                    z_loss: float = 1e-4, moe_aux_loss: float = 1e-2,
                    router_z_loss: float = 1e-3, dropout_seed: int = 0,
                    skip_nonfinite: bool = False):
  """train_step(state, batch) -> (state, metrics). The loss is normalized by the
  number of target tokens in the whole batch, so microbatching changes nothing.
  metrics['nonfinite'] is 1 when the loss, the gradients, the new parameters or the
  new optimizer state hold a non-finite value (so what a checkpoint saves is always
  finite); with `skip_nonfinite` such a step leaves the parameters and optimizer
  state unchanged.
  MoE models add `moe_aux_loss` x load-balancing loss + `router_z_loss` x router
  z-loss (each a mean over routing groups, summed over layers) to the objective;
  their metrics ('moe/...') are averaged over microbatches."""
  def loss_and_sums(params, batch, key, total_weight):
    sums, router = _sums(graphdef, params, batch, key, z_loss)
    if router:
      # Router losses are group means: in token-sum units of the whole batch, split
      # evenly over microbatches, they become plain means after the division below.
      extra = moe_aux_loss * router["moe/aux_loss"] + router_z_loss * router["moe/router_z_loss"]
      sums["loss"] = sums["loss"] + extra * total_weight / num_microbatches
    return sums["loss"], (sums, router)

  grad_fn = jax.grad(loss_and_sums, has_aux=True)

  def train_step(state, batch):
    with partitioning.axis_rules(mesh, rules):
      params = state["params"]
      key = jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
      total_weight = jnp.maximum(jnp.sum(batch[LOSS_WEIGHTS].astype(jnp.float32)),
                                 1.0)
      if num_microbatches == 1:
        grads, (sums, router) = grad_fn(params, batch, key, total_weight)
      else:
        def body(carry, xs):
          i, micro = xs
          g, (s, r) = grad_fn(params, micro, jax.random.fold_in(key, i), total_weight)
          return jax.tree.map(jnp.add, carry, (g, s)), r

        zeros = (jax.tree.map(jnp.zeros_like, params),
                 {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
        (grads, sums), router = jax.lax.scan(
            body, zeros, (jnp.arange(num_microbatches), _microbatches(batch, num_microbatches)))
        router = jax.tree.map(lambda x: jnp.mean(x, axis=0), router)
      grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
      grad_norm = optax.tree.norm(grads)
      finite = (jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
                & _all_finite(new_params) & _all_finite(opt_state))
      if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)
        new_params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
      new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
      metrics = summarize(sums)
      metrics.update(router)
      metrics.update(grad_norm=grad_norm, learning_rate=schedule(state["step"]),
                     nonfinite=(~finite).astype(jnp.int32))
      return new_state, metrics

  return train_step


def make_eval_step(graphdef, *, mesh, rules, z_loss: float = 1e-4):
  """eval_step(params, batch) -> token sums (add them up over batches, then `summarize`)."""

  def eval_step(params, batch):
    with partitioning.axis_rules(mesh, rules):
      return _sums(graphdef, params, batch, None, z_loss)[0]

  return eval_step
