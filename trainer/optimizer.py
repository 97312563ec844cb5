"""Optimizers (Adafactor, the T5 default, and AdamW) and learning-rate schedules."""

import gin
import jax
import jax.numpy as jnp
import optax

from ul2x.model.config import check_range

FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)  # a larger rate is inf in the step

SCHEDULES = ("rsqrt", "cosine", "constant")
OPTIMIZERS = ("adafactor", "adamw")


@gin.configurable
def learning_rate_schedule(total_steps: int, *, schedule: str = "rsqrt",
                           learning_rate: float = 1e-2, warmup_steps: int = 100,
                           final_fraction: float = 0.1):
  """Linear warmup to `learning_rate`, then rsqrt decay (T5), cosine to
  `final_fraction * learning_rate` at `total_steps`, or constant."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is unknown; use one of {SCHEDULES}.")
  name = "learning_rate_schedule."
  check_range(name + "learning_rate", learning_rate, 0, FLOAT32_MAX, low_open=True)
  check_range(name + "warmup_steps", warmup_steps, 0, integer=True)
  check_range(name + "final_fraction", final_fraction, 0, 1)
  warmup_steps = max(warmup_steps, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / warmup_steps)
    if schedule == "rsqrt":
      decay = jnp.sqrt(warmup_steps / jnp.maximum(step, warmup_steps))
    elif schedule == "cosine":
      progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
      decay = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    else:
      decay = 1.0
    return learning_rate * warm * decay

  return fn


@gin.configurable
def create_optimizer(total_steps: int, *, name: str = "adafactor",
                     grad_clip_norm: float | None = None, weight_decay: float = 0.0,
                     b1: float = 0.9, b2: float = 0.95):
  """-> (optax transformation, schedule). AdamW's weight decay skips 1-D params (norm
  scales); Adafactor's `weight_decay_rate` decays every parameter."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer name={name!r} is unknown; use one of {OPTIMIZERS}.")
  if grad_clip_norm is not None:
    check_range("create_optimizer.grad_clip_norm", grad_clip_norm, 0, low_open=True)
  check_range("create_optimizer.weight_decay", weight_decay, 0)
  for key, value in (("b1", b1), ("b2", b2)):
    check_range("create_optimizer." + key, value, 0, 1, high_open=True)
  schedule = learning_rate_schedule(total_steps)
  if name == "adafactor":
    tx = optax.adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0,
                         multiply_by_parameter_scale=True,
                         weight_decay_rate=weight_decay or None)
  else:
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx, schedule
