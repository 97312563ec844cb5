"""MFU of a ~1B-parameter UL2 encoder-decoder and of its mixture-of-experts twin on one
accelerator: the jitted train step on synthetic batches, bfloat16 activations, per
remat policy, flash attention where the platform has compiled kernels; and the dry
run's memory figure (XLA's memory_analysis of the same compiled step) against the
device's measured peak. On a device each run is a process of its own, so its peak is
its own (a process's `peak_bytes_in_use` never goes down) and a crash ends only that run.
One JSON line per run on stderr as it finishes, then the whole result on stdout.

Imports only model/, kernels/, partitioning/ and the train step: no TensorFlow, seqio
or tasks/. On the GPU machine (no gin-config there: carry its wheel as .whl, see the
device README), from the repository root:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ul2x
  PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 python3 bench/mfu.py

A check of the script on CPU (a tiny model, two steps; figures mean nothing):

  JAX_PLATFORMS=cpu .venv/bin/python bench/mfu.py --smoke

Compile only, for a TPU topology or GPUs from any machine (the dry run: memory per device
and the time bound at 100% MFU; needs `make libtpu` or `make cuda_plugin`):

  PYTHONPATH=.libtpu JAX_PLATFORMS=cpu .venv/bin/python bench/mfu.py --topology v5p:2x2x1
  PYTHONPATH=.cuda_plugin JAX_PLATFORMS=cpu .venv/bin/python bench/mfu.py --topology h200:1
"""

import argparse
import dataclasses
import json
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from ul2x import partitioning
from ul2x.partitioning import topologies
from ul2x.model import TransformerConfig
from ul2x.model.flops import tokens_per_example, training_flops_per_example
from ul2x.trainer.reporting import peak_flops_per_device
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

# ~1.1B parameters: T5 v1.1-style, 16+16 layers, d_model 1536, 12 heads x 128, gated-GeLU
# MLP 4096, a 32k vocabulary. The MoE twin has every 2nd MLP a mixture of 8 experts of
# the same size (expert choice in the encoder, top-2 in the decoder), about 3.2B in all.
# Its dropless twins route top-2 in both stacks with no capacity, through the Pallas
# grouped matmul or jax.lax.ragged_dot (docs/moe.md).
DENSE = TransformerConfig(vocab_size=32128, emb_dim=1536, num_heads=12, head_dim=128,
                          mlp_dim=4096, num_encoder_layers=16, num_decoder_layers=16,
                          dtype="bfloat16", scan_layers=True)
MODELS = {
    "dense_1b": DENSE,
    "moe_1b_8e": dataclasses.replace(DENSE, num_experts=8, moe_layer_interval=2,
                                     expert_mlp_dim=4096, capacity_factor=2.0),
    "tiny": TransformerConfig(dtype="bfloat16", scan_layers=True),  # --smoke
}
MODELS |= {
    f"moe_1b_8e_dropless{suffix}": dataclasses.replace(
        MODELS["moe_1b_8e"], encoder_router="top2", moe_dispatch="dropless", moe_matmul=matmul)
    for suffix, matmul in (("", "pallas"), ("_ragged_dot", "ragged_dot"))}


def synthetic_batch(cfg: TransformerConfig, batch_size: int, lengths: dict) -> dict:
  key = jax.random.key(0)
  tokens = lambda key, n: jax.random.randint(key, (batch_size, n), 3, cfg.vocab_size, jnp.int32)
  enc = tokens(key, lengths["encoder_input_tokens"])
  dec = tokens(jax.random.fold_in(key, 1), lengths["decoder_input_tokens"])
  return dict(encoder_input_tokens=enc, decoder_target_tokens=dec,
              decoder_input_tokens=jnp.pad(dec[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=jnp.ones_like(dec))


def peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run(cfg: TransformerConfig, batch_size: int, lengths: dict, steps: int,
        mesh_sizes: dict | None = None, peak_flops: float | None = None) -> dict:
  """Compiles the train step on a mesh of the local devices (`mesh_sizes`, default all
  data-parallel), runs it `steps` times after one warm-up step and returns step time,
  tokens/s, model TFLOP/s, MFU (against `peak_flops` per device, default the data
  sheet's or a measured matmul rate), and memory: compiled estimate and measured peak."""
  job = setup(cfg, mesh=partitioning.create_mesh(**(mesh_sizes or dict(data=-1))),
              optimizer=create_optimizer(1000, name="adafactor"))
  state = job.init_state()
  data = jax.device_put(synthetic_batch(cfg, batch_size, lengths), job.batch_sharding)
  start = time.perf_counter()
  step = job.train_step().lower(state, data).compile()
  compile_s = time.perf_counter() - start
  memory = step.memory_analysis()
  estimate = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  flops = batch_size * training_flops_per_example(cfg, lengths)
  peak = (peak_flops or peak_flops_per_device()) * jax.device_count()
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return {"params": params, "compile_s": compile_s, "step_time_s": seconds,
          "tokens_per_s": batch_size * tokens_per_example(cfg, lengths) / seconds,
          "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak, "loss": float(metrics["loss"]),
          "estimated_bytes_per_device": estimate, "peak_bytes_in_use": peak_bytes()}


def compile_only(cfg: TransformerConfig, batch_size: int, args, topology: str) -> dict:
  """The dry run of `cfg` on the topology's devices (trainer/dry_run.py)."""
  from ul2x.trainer import dry_run  # imports the input pipeline: TensorFlow
  devices = topologies.topology_devices(topology)
  job = setup(cfg, mesh=partitioning.create_mesh(data=-1, devices=devices),
              optimizer=create_optimizer(1000, name="adafactor"))
  r = dry_run.measure(job, batch_size=batch_size, step_options={},
                      task_feature_lengths={"inputs": args.inputs, "targets": args.targets})
  keys = ("devices", "device_kind", "compile_seconds", "params_bytes", "opt_state_bytes",
          "temp_bytes", "total_bytes", "compiler_out_of_memory", "flops_per_step",
          "step_time_bound_s")
  return {k: r[k] for k in keys}


def run_in_subprocess(row: str, args) -> dict:
  """`run` of one MODEL:REMAT in a fresh process, with this one's settings."""
  flags = [f"--{name}={getattr(args, name)}"
           for name in ("attention", "batch_size", "inputs", "targets", "steps")]
  done = subprocess.run([sys.executable, __file__, *flags, f"--row={row}"],
                        capture_output=True, text=True)
  if done.returncode:
    lines = done.stderr.strip().splitlines() or ["no output"]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    raise RuntimeError(f"exit {done.returncode}: {(errors or lines)[-1]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="dense_1b,moe_1b_8e",
                      help=f"of {', '.join(m for m in MODELS if m != 'tiny')}")
  parser.add_argument("--remats", default="dots_saveable,full",
                      help="TransformerConfig.remat policies, e.g. none,dots_saveable,full")
  parser.add_argument("--attention", default="auto",
                      help="auto: 'flash' on GPU and TPU, else 'reference'")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--inputs", type=int, default=1024)
  parser.add_argument("--targets", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps (CPU check)")
  parser.add_argument("--row", help="MODEL:REMAT: one run in this process (the loop "
                      "starts one process per run)")
  parser.add_argument("--topology", help="compile only, for this TPU topology or GPUs (e.g. "
                      "v5p:2x2x1, h200:1)")
  args = parser.parse_args()
  if args.smoke:
    args.models, args.remats, args.batch_size, args.steps = "tiny", "none,full", 2, 2
    args.inputs, args.targets = 64, 16
  lengths = {"encoder_input_tokens": args.inputs, "decoder_input_tokens": args.targets}
  if args.row:  # one run, in a process of its own (started by the loop below)
    model, remat = args.row.split(":")
    attention = args.attention if args.attention != "auto" else (
        "flash" if jax.default_backend() in ("gpu", "tpu") else "reference")
    cfg = dataclasses.replace(MODELS[model], remat=remat, attention=attention)
    print(json.dumps({"attention": attention} | run(cfg, args.batch_size, lengths, args.steps)))
    return
  # No JAX backend in this process until the runs are done: on a GPU it would take 75% of
  # the memory, and a TPU admits one process.
  results = []
  for model in args.models.split(","):
    for remat in args.remats.split(","):
      row = {"model": model, "remat": remat}
      try:
        if args.topology:
          attention = "flash" if args.attention == "auto" else args.attention
          row |= {"attention": attention} | compile_only(
              dataclasses.replace(MODELS[model], remat=remat, attention=attention),
              args.batch_size, args, args.topology)
        else:
          row |= run_in_subprocess(f"{model}:{remat}", args)
      except Exception as error:  # out of memory, or a kernel that fails here: keep going
        row["error"] = " ".join(str(error).split())[:300]
      results.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  print(json.dumps({
      "bench": "mfu", "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
      "batch_size": args.batch_size, "lengths": lengths,
      "peak_flops_per_device": peak_flops_per_device(), "results": results}, indent=2))


if __name__ == "__main__":
  main()
