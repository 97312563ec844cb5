"""Trains the same T5 v1.1 encoder-decoder with ul2x and with PyTorch (Hugging Face
`transformers`) on the same machine, in one run; prints JSON.

Both sides: float32, AdamW, vocab 512, batch 8, 256 input + 64 target tokens, no
dropout, untied output head, one process. ul2x runs its jitted train step
(`trainer/setup.py`) on one device; PyTorch runs `T5ForConditionalGeneration` eagerly
with as many threads as the machine has cores. Each size reports each framework's step
time (best of --rounds rounds of --steps steps, the frameworks interleaved within each
round), tokens/s, model FLOP/s (the analytic count of model/flops.py, the same for both)
over each framework's own 1024^3 float32 matmul rate measured in the same run, ul2x's
compile time, the ratio ul2x / PyTorch tokens/s, and each framework's
`gradient_over_forward`: the time of the loss's gradient (forward + backward) over the
loss alone (best of --rounds, interleaved with the steps). Run on one CPU device, on an
otherwise idle machine:

  JAX_PLATFORMS=cpu .venv/bin/python bench/vs_pytorch.py

(`pip install -e .[bench]` installs torch 2.13.0 and transformers.) Leave
OMP_WAIT_POLICY unset: PASSIVE makes PyTorch's threads sleep at every barrier, which
costs it about 15% here (0.58 -> 0.69 s per step at d256).
"""

import argparse
import datetime
import json
import os
import platform
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ul2x import partitioning
from ul2x.export.mappings import t5_config
from ul2x.model import TransformerConfig
from ul2x.model.contract import loss_sums
from ul2x.model.flops import tokens_per_example, training_flops_per_example
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

SIZES = {
    "d256_4+4": dict(emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                     num_encoder_layers=4, num_decoder_layers=4),
    "d512_8+8": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=2048,
                     num_encoder_layers=8, num_decoder_layers=8),
}
LENGTHS = {"encoder_input_tokens": 256, "decoder_input_tokens": 64}
VOCAB = 512
LEARNING_RATE = 1e-3


def make_batch(batch_size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, VOCAB, (batch_size, LENGTHS["encoder_input_tokens"]), np.int32)
  targets = rng.integers(3, VOCAB, (batch_size, LENGTHS["decoder_input_tokens"]), np.int32)
  return dict(encoder_input_tokens=inputs, decoder_target_tokens=targets,
              decoder_input_tokens=np.pad(targets[:, :-1], ((0, 0), (1, 0))),
              decoder_loss_weights=np.ones_like(targets))


def ul2x_trainer(cfg: TransformerConfig, batch: dict):
  """-> (run(n): n train steps, compile seconds, {'forward': f, 'gradient': f}: the
  loss alone and its parameter gradient, each a jitted call)."""
  with gin.unlock_config():
    gin.bind_parameter("create_optimizer.name", "adamw")
    gin.bind_parameter("learning_rate_schedule.schedule", "constant")
    gin.bind_parameter("learning_rate_schedule.learning_rate", LEARNING_RATE)
  job = setup(cfg, mesh=partitioning.create_mesh(devices=jax.devices()[:1]),
              optimizer=create_optimizer(1000))
  state = {"s": job.init_state()}
  data = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, job.batch_sharding)
  start = time.perf_counter()
  step = job.train_step().lower(state["s"], data).compile()
  compile_s = time.perf_counter() - start

  def run(n: int):
    for _ in range(n):
      state["s"], metrics = step(state["s"], data)
    jax.block_until_ready(metrics)

  def loss(params):
    with partitioning.axis_rules(job.mesh, job.rules):
      logits = nnx.merge(job.graphdef, params)(data)
    return loss_sums(logits, data, 0.0)["loss"]

  params = job.init_state()["params"]
  passes = {name: (lambda fn=jax.jit(fn): jax.block_until_ready(fn(params)))
            for name, fn in (("forward", loss), ("gradient", jax.grad(loss)))}
  return run, compile_s, passes


def torch_trainer(cfg: TransformerConfig, batch: dict):
  """-> (run(n): n eager AdamW steps of T5ForConditionalGeneration, {'forward': f,
  'gradient': f}: the training-mode loss alone, and with its backward pass)."""
  import torch
  import transformers

  config = transformers.T5Config(**{k: v for k, v in t5_config(cfg).items()
                                    if k not in ("architectures",)})
  model = transformers.T5ForConditionalGeneration(config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95),
                          weight_decay=0.0)
  inputs = torch.from_numpy(batch["encoder_input_tokens"]).long()
  dec_in = torch.from_numpy(batch["decoder_input_tokens"]).long()
  labels = torch.from_numpy(batch["decoder_target_tokens"]).long()

  def run(n: int):
    for _ in range(n):
      out = model(input_ids=inputs, decoder_input_ids=dec_in, labels=labels)
      out.loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)

  def forward():
    return model(input_ids=inputs, decoder_input_ids=dec_in, labels=labels).loss

  def gradient():
    forward().backward()
    model.zero_grad(set_to_none=True)

  return run, {"forward": forward, "gradient": gradient}


def matmul_rates(n: int = 1024, repeats: int = 10) -> dict:
  """float32 n x n matmul FLOP/s of each framework on this machine."""
  import torch

  a = jnp.full((n, n), 1.0 / n, jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  t = torch.full((n, n), 1.0 / n)
  rates = {}
  for name, fn in (("ul2x", lambda: jax.block_until_ready(mm(a))), ("pytorch", lambda: t @ t)):
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    rates[name] = 2 * n**3 / best
  return rates


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compare(name: str, cfg: TransformerConfig, args, rates: dict) -> dict:
  batch = make_batch(args.batch_size)
  runs, passes = {}, {}
  runs["pytorch"], passes["pytorch"] = torch_trainer(cfg, batch)
  runs["ul2x"], compile_s, passes["ul2x"] = ul2x_trainer(cfg, batch)
  for k in runs:
    runs[k](1)  # warm-up (and compilation of the passes)
    for fn in passes[k].values():
      fn()
  best = {k: float("inf") for k in runs}
  best_pass = {(k, name): float("inf") for k in runs for name in passes[k]}
  for _ in range(args.rounds):
    for k, run in runs.items():
      best[k] = min(best[k], _timed(lambda: run(args.steps)) / args.steps)
      for name, fn in passes[k].items():
        best_pass[k, name] = min(best_pass[k, name], _timed(fn))
  tokens = args.batch_size * tokens_per_example(cfg, LENGTHS)
  flops = args.batch_size * training_flops_per_example(cfg, LENGTHS)
  result = {k: {"step_time_s": round(s, 4), "tokens_per_s": round(tokens / s, 1),
                "model_gflops_per_s": round(flops / s / 1e9, 2),
                "fraction_of_matmul_rate": round(flops / s / rates[k], 3)}
            for k, s in best.items()}
  for k in runs:
    result[k]["gradient_over_forward"] = round(best_pass[k, "gradient"]
                                               / best_pass[k, "forward"], 2)
  result["ul2x"]["compile_s"] = round(compile_s, 2)
  result["ul2x_over_pytorch_tokens_per_s"] = round(best["pytorch"] / best["ul2x"], 3)
  result["model_gflops_per_step"] = round(flops / 1e9, 2)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
  args = parser.parse_args()
  import torch

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  rates = matmul_rates()
  results = {name: compare(name, TransformerConfig(vocab_size=VOCAB, **SIZES[name]), args,
                           rates) for name in args.sizes}
  print(json.dumps({
      "bench": "vs_pytorch", "date": datetime.date.today().isoformat(),
      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
      "jax": jax.__version__, "torch": torch.__version__,
      "device": jax.devices()[0].device_kind, "batch_size": args.batch_size,
      "lengths": LENGTHS, "matmul_gflops_per_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
      "results": results}, indent=2))


if __name__ == "__main__":
  main()
