"""Times the train step of a fixed small encoder-decoder and prints JSON.

MFU is achieved FLOP/s (analytic count, model/flops.py) over the per-device
matmul rate measured in the same run (trainer/reporting.py), so figures from
noisy machines stay comparable. Run on 8 simulated CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python bench/train_step.py
"""

import argparse
import json
import platform

import jax

from mfu import run  # bench/mfu.py: the same timing of the same train step
from ul2x.model import TransformerConfig
from ul2x.trainer.reporting import measured_matmul_flops, peak_flops_per_device

CONFIG = TransformerConfig(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                           num_encoder_layers=2, num_decoder_layers=2)
LENGTHS = {"encoder_input_tokens": 128, "decoder_input_tokens": 64}
MESHES = {"data8": dict(data=-1), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
REPORTED = ("step_time_s", "tokens_per_s", "model_tflops_per_s", "mfu")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  peak = peak_flops_per_device()
  results = {}
  for name, sizes in MESHES.items():
    r = run(CONFIG, args.batch_size, LENGTHS, args.steps, mesh_sizes=sizes, peak_flops=peak)
    results[name] = {k: r[k] for k in REPORTED}
  print(json.dumps({
      "bench": "train_step", "machine": platform.processor() or platform.machine(),
      "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "config": "tiny enc-dec d128 2+2 layers, enc 128 / dec 64 tokens",
      "batch_size": args.batch_size, "peak_flops_per_device": peak,
      "matmul_flops_per_device_measured": measured_matmul_flops(), "results": results,
  }, indent=2))


if __name__ == "__main__":
  main()
