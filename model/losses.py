"""Token cross-entropy with T5X's z-loss, returned as sums so microbatches add up exactly."""

import jax
import jax.numpy as jnp

SUM_KEYS = ("loss", "cross_entropy", "z_loss", "correct", "weight")


def cross_entropy_sums(logits, targets, weights, z_loss: float = 0.0) -> dict:
  """logits: [batch, len, vocab] float32; targets, weights: [batch, len].

  Returns sums over tokens of: `loss` (cross-entropy + z-loss, the training
  objective), `cross_entropy`, `z_loss` (z_loss * logsumexp^2), `correct`
  (argmax hits) and `weight` (number of target tokens).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  cross_entropy = log_z - target_logit
  z = z_loss * jnp.square(log_z)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {
      "loss": jnp.sum((cross_entropy + z) * weights),
      "cross_entropy": jnp.sum(cross_entropy * weights),
      "z_loss": jnp.sum(z * weights),
      "correct": jnp.sum(correct * weights),
      "weight": jnp.sum(weights),
  }
