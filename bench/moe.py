"""Times the train step of the tiny UL2-MoE model against its dense twin and prints JSON.

The twin is `gin_configs/models/tiny.gin`, whose activated FLOPs equal those of
`gin_configs/models/ul2_moe_tiny.gin` (model/flops.py counts both). Both train
on the same mesh (data=2 x expert=4 by default) with the same synthetic batch;
step times are medians over interleaved rounds, so machine noise hits both.
Reported:

- step-time ratio MoE / dense, and the MoE step's extra share
  (T_moe - T_dense) / T_moe: at equal matmul FLOPs, that is what routing,
  dispatch, combine and the all-to-alls cost;
- compiled memory of each step (XLA's memory analysis);
- per MoE layer (forward + backward, one device), the share of time outside the
  expert matmuls, for the gather dispatch and its one-hot reference twin, at the
  config's group size and a larger one (the one-hot tensor grows with its square);
- one top-2 (decoder) MoE layer, forward + backward on one device, with capacity
  (gather) and dropless (sorted tokens, `jax.lax.ragged_dot`), and the share of
  choices the capacity drops.

--dispatch sets the MoE model's `moe_dispatch` for the step timing and the curves;
'dropless' also switches its encoder to top-2 (expert choice has no dropless form),
which keeps the activated FLOPs (2 expert MLPs per token).

With --curve_steps N, both models also train N steps on the embedded corpus
(span corruption, the train job) and the loss curves go into the JSON and, with
--plot, a PNG. Run on 8 simulated CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python bench/moe.py --curve_steps 600 --plot docs/moe_loss_curve.png
"""

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import gin
import jax
import jax.numpy as jnp
from flax import nnx

import ul2x.tasks  # noqa: F401  registers the default tasks
from ul2x import partitioning
from ul2x.trainer.loop import train
from ul2x.gin_setup import PACKAGE_DIR
from ul2x.model import TransformerConfig
from ul2x.model.flops import training_flops_per_example
from ul2x.model.layers import ACTIVATIONS
from ul2x.model.moe import DISPATCHES, MoeMLP, expert_capacity, group_layout
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

LENGTHS = {"encoder_input_tokens": 128, "decoder_input_tokens": 64}
TASK_LENGTHS = {"inputs": 128, "targets": 64}


def load_config(name: str) -> TransformerConfig:
  gin.clear_config()
  gin.parse_config_file(os.path.join(PACKAGE_DIR, "gin_configs", "models", name))
  cfg = TransformerConfig()
  gin.clear_config()
  return cfg


def synthetic_batch(cfg, size: int) -> dict:
  enc = jax.random.randint(jax.random.key(0), (size, LENGTHS["encoder_input_tokens"]), 3,
                           cfg.vocab_size, jnp.int32)
  dec = jax.random.randint(jax.random.key(1), (size, LENGTHS["decoder_input_tokens"]), 3,
                           cfg.vocab_size, jnp.int32)
  return dict(encoder_input_tokens=enc, decoder_target_tokens=dec,
              decoder_input_tokens=jnp.pad(dec[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=jnp.ones_like(dec))


def compiled_step(cfg, mesh_sizes: dict, batch_size: int):
  """-> (run(n) timing n steps, memory analysis dict) for one model."""
  job = setup(cfg, mesh=partitioning.create_mesh(**mesh_sizes),
              optimizer=create_optimizer(1000))
  state = job.init_state()
  data = jax.device_put(synthetic_batch(cfg, batch_size), job.batch_sharding)
  step = job.train_step()
  compiled = step.lower(state, data).compile()
  analysis = compiled.memory_analysis()
  memory = {k: int(getattr(analysis, f"{k}_in_bytes")) for k in
            ("argument_size", "output_size", "temp_size", "generated_code_size")}
  holder = {"state": state}

  def run(n: int) -> float:
    state = holder["state"]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    holder["state"] = state
    return (time.perf_counter() - start) / n

  run(2)  # warm up
  return run, memory


def layer_dispatch_share(cfg, batch_size: int, dispatch: str, group_size: int,
                         repeats: int) -> dict:
  """Forward + backward of one encoder MoE layer on one device, against the expert
  matmuls alone on the same slots."""
  cfg = dataclasses.replace(cfg, moe_dispatch=dispatch, group_size=group_size)
  moe = MoeMLP(cfg, router=cfg.encoder_router, rngs=nnx.Rngs(0))
  length = LENGTHS["encoder_input_tokens"]
  x = jax.random.normal(jax.random.key(0), (batch_size, length, cfg.emb_dim))
  rows, chunk = group_layout(batch_size, length, cfg.group_size)
  groups = batch_size * length // (rows * chunk)
  capacity = expert_capacity(rows * chunk, cfg.num_experts, cfg.capacity_factor)
  slots = jax.random.normal(jax.random.key(1), (groups, cfg.num_experts, capacity, cfg.emb_dim))
  act = ACTIVATIONS[cfg.activation]  # the layer's own, so both sides run the same MLP

  def full(moe, x):
    y = moe(x)
    del moe.router_stats
    return jnp.sum(y)

  def experts_only(moe, s):
    e = moe.experts
    h = act(jnp.einsum("gecd,edh->gech", s, e.wi_0[...])) * jnp.einsum(
        "gecd,edh->gech", s, e.wi_1[...])
    return jnp.sum(jnp.einsum("gech,ehd->gecd", h, e.wo[...]))

  times = {}
  for name, fn, arg in (("layer", full, x), ("experts", experts_only, slots)):
    grad = nnx.jit(nnx.grad(fn, argnums=(0, 1)))
    jax.block_until_ready(grad(moe, arg))
    samples = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(grad(moe, arg))
      samples.append(time.perf_counter() - start)
    times[name] = statistics.median(samples)
  one_hot_bytes = 4 * groups * cfg.num_experts * capacity * rows * chunk
  return {"layer_fwd_bwd_s": times["layer"], "experts_fwd_bwd_s": times["experts"],
          "outside_expert_matmuls_share": 1 - times["experts"] / times["layer"],
          "slots_bytes": 4 * slots.size, "one_hot_tensor_bytes": one_hot_bytes}


def token_choice_layer(cfg, batch_size: int, repeats: int) -> dict:
  """Forward + backward of one decoder (top-k) MoE layer on one device, capacity against
  dropless dispatch, on the same parameters and tokens."""
  length = LENGTHS["decoder_input_tokens"]
  x = jax.random.normal(jax.random.key(0), (batch_size, length, cfg.emb_dim))

  def full(moe, x):
    y = moe(x)
    sown = nnx.to_pure_dict(nnx.pop(moe, nnx.Intermediate))["router_stats"][0]
    return jnp.sum(y), sown["dropped_fraction"]

  result = {"router": cfg.decoder_router, "tokens": batch_size * length}
  for dispatch in ("gather", "dropless"):
    layer_cfg = dataclasses.replace(cfg, moe_dispatch=dispatch, encoder_router=cfg.decoder_router)
    moe = MoeMLP(layer_cfg, router=cfg.decoder_router, rngs=nnx.Rngs(0))
    grad = nnx.jit(nnx.grad(full, argnums=(0, 1), has_aux=True))
    _, dropped = jax.block_until_ready(grad(moe, x))
    samples = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(grad(moe, x))
      samples.append(time.perf_counter() - start)
    result[dispatch] = {"layer_fwd_bwd_s": statistics.median(samples),
                        "dropped_fraction": float(dropped)}
  return result


def speed(moe_cfg, dense_cfg, mesh_sizes: dict, batch_size: int, rounds: int,
          steps: int) -> dict:
  runs, memory = {}, {}
  for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
    runs[name], memory[name] = compiled_step(cfg, mesh_sizes, batch_size)
  samples = {name: [] for name in runs}
  for _ in range(rounds):  # interleaved, so load changes hit both models
    for name, run in runs.items():
      samples[name].append(run(steps))
  times = {name: statistics.median(s) for name, s in samples.items()}
  flops = {name: training_flops_per_example(cfg, LENGTHS)
           for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg))}
  return {
      "mesh": mesh_sizes, "batch_size": batch_size,
      "training_flops_per_example": flops,
      "step_time_s": times, "step_time_ratio_moe_over_dense": times["moe"] / times["dense"],
      "moe_extra_share_of_step": (times["moe"] - times["dense"]) / times["moe"],
      "compiled_memory_bytes": memory,
      "temp_memory_ratio_moe_over_dense": memory["moe"]["temp_size"] / memory["dense"][
          "temp_size"],
  }


def _scalars(directory: str, tag: str) -> list[tuple[int, float]]:
  import tensorflow as tf
  points = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          points.append((event.step, float(tf.make_ndarray(value.tensor))))
  return sorted(points)


def loss_curves(moe_cfg, dense_cfg, mesh_sizes: dict, steps: int, batch_size: int) -> dict:
  """Both models through the train job on the embedded corpus; curves from TensorBoard."""
  curves = {}
  with tempfile.TemporaryDirectory() as root:
    for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
      with gin.unlock_config():
        for axis, size in mesh_sizes.items():
          gin.bind_parameter(f"create_mesh.{axis}", size)
      model_dir = os.path.join(root, name)
      start = time.perf_counter()
      with contextlib.redirect_stdout(sys.stderr):
        train(model_dir=model_dir, train_steps=steps,
                      mixture_or_task_name="ul2x_span_corruption",
                      task_feature_lengths=TASK_LENGTHS, model_config=cfg,
                      batch_size=batch_size, log_every=10, eval_every=steps, eval_batches=8,
                      checkpoint_every=steps, async_checkpointing=False)
      gin.clear_config()
      curves[name] = {
          "wall_s": time.perf_counter() - start,
          "train_cross_entropy": _scalars(os.path.join(model_dir, "train"), "cross_entropy"),
          "eval_cross_entropy": _scalars(os.path.join(model_dir, "eval"), "cross_entropy"),
      }
  return curves


def plot(curves: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  labels = {"moe": "ul2_moe_tiny (8 experts, every 2nd MLP)", "dense": "tiny (dense twin)"}
  for name, curve in curves.items():
    steps, losses = zip(*curve["train_cross_entropy"])
    ax.plot(steps, losses, label=labels[name])
  ax.set_xlabel("step")
  ax.set_ylabel("train cross-entropy per target token")
  ax.set_title("Span corruption on the embedded corpus, equal activated FLOPs")
  final = min(curve["train_cross_entropy"][-1][1] for curve in curves.values())
  ax.set_ylim(final - 0.2, final + 1.5)  # the first steps (loss ~6) are off the chart
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=4, help="steps per timing round")
  parser.add_argument("--expert", type=int, default=4, help="size of the 'expert' mesh axis")
  parser.add_argument("--layer_repeats", type=int, default=10)
  parser.add_argument("--layer_group_sizes", default="64,512",
                      help="group sizes for the per-layer dispatch measurement")
  parser.add_argument("--dispatch", default="gather", choices=DISPATCHES,
                      help="moe_dispatch of the MoE model's train step and curves")
  parser.add_argument("--curve_steps", type=int, default=0, help="0: no loss curves")
  parser.add_argument("--plot", default=None, help="PNG path for the loss curves")
  args = parser.parse_args()
  tiny_moe, dense_cfg = load_config("ul2_moe_tiny.gin"), load_config("tiny.gin")
  dropless = {"encoder_router": "top2"} if args.dispatch == "dropless" else {}
  moe_cfg = dataclasses.replace(tiny_moe, moe_dispatch=args.dispatch, **dropless)
  mesh_sizes = {"data": -1, "expert": args.expert}
  result = {
      "bench": "moe", "machine": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "config": "ul2_moe_tiny.gin vs tiny.gin, enc 128 / dec 64 tokens, Adafactor",
      "moe_dispatch": moe_cfg.moe_dispatch, "encoder_router": moe_cfg.encoder_router,
      "speed": speed(moe_cfg, dense_cfg, mesh_sizes, args.batch_size, args.rounds,
                     args.steps),
      "moe_layer": {f"group_{g}_{d}": layer_dispatch_share(tiny_moe, args.batch_size, d, g,
                                                           args.layer_repeats)
                    for g in map(int, args.layer_group_sizes.split(","))
                    for d in ("gather", "one_hot")},
      "token_choice_layer": token_choice_layer(tiny_moe, args.batch_size, args.layer_repeats),
  }
  if args.curve_steps:
    curves = loss_curves(moe_cfg, dense_cfg, mesh_sizes, args.curve_steps, args.batch_size)
    result["loss_curves"] = curves
    if args.plot:
      plot(curves, args.plot)
      result["plot"] = args.plot
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
