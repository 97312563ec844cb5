"""Times the train step of a fixed small encoder-decoder and prints JSON.

MFU is achieved FLOP/s (analytic count, model/flops.py) over the per-device
matmul rate measured in the same run (trainer/metrics.py), so figures from
noisy machines stay comparable. Run on 8 simulated CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python bench/train_step.py
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from ul2x import partitioning
from ul2x.model import TransformerConfig
from ul2x.model.flops import tokens_per_example, training_flops_per_example
from ul2x.trainer.metrics import measured_matmul_flops, peak_flops_per_device
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

CONFIG = TransformerConfig(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                           num_encoder_layers=2, num_decoder_layers=2)
LENGTHS = {"encoder_input_tokens": 128, "decoder_input_tokens": 64}
MESHES = {"data8": dict(data=-1), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def batch(key, size: int) -> dict:
  enc = jax.random.randint(jax.random.key(key), (size, LENGTHS["encoder_input_tokens"]), 3,
                           CONFIG.vocab_size, jnp.int32)
  dec = jax.random.randint(jax.random.key(key + 1), (size, LENGTHS["decoder_input_tokens"]),
                           3, CONFIG.vocab_size, jnp.int32)
  return dict(encoder_input_tokens=enc, decoder_target_tokens=dec,
              decoder_input_tokens=jnp.pad(dec[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=jnp.ones_like(dec))


def time_step(mesh_sizes: dict, batch_size: int, steps: int) -> dict:
  job = setup(CONFIG, mesh=partitioning.create_mesh(**mesh_sizes),
              optimizer=create_optimizer(1000))
  state = job.init_state()
  data = jax.device_put(batch(0, batch_size), job.batch_sharding)
  step = job.train_step()
  for _ in range(2):  # compile and warm up
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  flops = batch_size * training_flops_per_example(CONFIG, LENGTHS)
  return {"step_time_s": seconds,
          "tokens_per_s": batch_size * tokens_per_example(CONFIG, LENGTHS) / seconds,
          "model_tflops_per_s": flops / seconds / 1e12}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  peak = peak_flops_per_device()
  results = {}
  for name, sizes in MESHES.items():
    r = time_step(sizes, args.batch_size, args.steps)
    r["mfu"] = r["model_tflops_per_s"] * 1e12 / (peak * jax.device_count())
    results[name] = r
  print(json.dumps({
      "bench": "train_step", "machine": platform.processor() or platform.machine(),
      "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "config": "tiny enc-dec d128 2+2 layers, enc 128 / dec 64 tokens",
      "batch_size": args.batch_size, "peak_flops_per_device": peak,
      "matmul_flops_per_device_measured": measured_matmul_flops(), "results": results,
  }, indent=2))


if __name__ == "__main__":
  main()
