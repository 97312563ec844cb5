"""Shared helpers for tests that build a jitted train step on a mesh (no input pipeline)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x import partitioning
from ul2x.model import TransformerConfig
from ul2x.model.losses import cross_entropy_sums
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                         num_encoder_layers=2, num_decoder_layers=2)


def copy_batch(key: int, batch: int = 8, length: int = 16, vocab: int = 64) -> dict:
  """Encoder-decoder copy task: the decoder must reproduce the encoder tokens."""
  tokens = jax.random.randint(jax.random.key(key), (batch, length), 3, vocab, jnp.int32)
  return dict(encoder_input_tokens=tokens, decoder_target_tokens=tokens,
              decoder_input_tokens=jnp.pad(tokens[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=jnp.ones_like(tokens))


def build(mesh_sizes: dict, cfg=TINY, *, num_microbatches: int = 1, optimizer="adafactor",
          total_steps: int = 100):
  """-> (state, jitted train_step, batch shardings) on a mesh of prod(sizes) devices."""
  devices = jax.devices()[:math.prod(mesh_sizes.values())]
  job = setup(cfg, mesh=partitioning.create_mesh(**mesh_sizes, devices=devices),
              optimizer=create_optimizer(total_steps, name=optimizer))
  step = job.train_step(num_microbatches=num_microbatches, donate=False)
  return job.init_state(), step, job.batch_sharding


def loss_and_grads(mesh_sizes: dict, cfg, batch: dict):
  """Cross-entropy sum and its parameter gradients, jitted on a mesh of prod(sizes)
  devices with parameters in their sharded layout (same seed-0 initialisation as `build`)."""
  devices = jax.devices()[:math.prod(mesh_sizes.values())]
  job = setup(cfg, mesh=partitioning.create_mesh(**mesh_sizes, devices=devices))
  params = job.init_state()["params"]

  def loss(params, batch):
    with partitioning.axis_rules(job.mesh, job.rules):
      logits = nnx.merge(job.graphdef, params)(batch)
    return cross_entropy_sums(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"])["loss"]

  batch = jax.device_put(batch, job.batch_sharding)
  return jax.jit(jax.value_and_grad(loss))(params, batch)
