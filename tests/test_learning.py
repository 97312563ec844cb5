"""A tiny learnable task: a few hundred steps drive the loss far below its start."""

import jax

from train_utils import build, copy_batch


def test_copy_task_loss_falls():
  state, step, sharding = build({"data": 2}, optimizer="adamw", total_steps=300)
  losses = []
  for i in range(300):
    state, metrics = step(state, jax.device_put(copy_batch(i % 16), sharding))
    losses.append(float(metrics["loss"]))
  start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
  assert end < 0.25 * start, (start, end)
