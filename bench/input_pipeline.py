"""Times the UL2 mixture's input pipeline against the train step that consumes it; prints JSON.

Three measurements of the quick-start configuration (the tiny model of
`gin_configs/models/tiny.gin`, `ul2x_ul2`, batch 16, inputs 128 / targets 64, packed,
mesh data=4 x fsdp=2), each after a warm-up:

- `pipeline`: `ul2x.tasks.get_dataset` alone: batches, examples (before packing) and
  non-padding tokens per second, plus its start-up time;
- `train_step`: the jitted train step on one fixed real batch (no input pipeline);
- `fed_train_step`: the train step fed batch by batch from the pipeline, as
  `trainer.loop` does, both sharing the machine.

The two step timings alternate in rounds (median reported) so that load from other
processes affects both alike.

The pipeline is not the bottleneck when its batch rate is well above the train
step's and the fed step takes about as long as the fixed-batch step. Run on 8
simulated CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python bench/input_pipeline.py

`--mode=resume` instead times a resume of the training stream (`trainer.data.DataStream`,
as the train job builds it) at each of `--positions` batches: restoring the iterator
state a checkpoint holds (what the trainer does), against regenerating and dropping that
many batches (the replay of checkpoints written before iterator states were saved).
Each time runs from building the stream to its first batch, which must be the batch an
uninterrupted stream gives there; a fresh start is timed alike for reference. Medians of
`--rounds` interleaved rounds.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import ul2x.tasks
from ul2x import gin_setup, partitioning
from ul2x.model import TransformerConfig
from ul2x.trainer.data import DataStream
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup


def pipeline_rates(batches: list[dict[str, np.ndarray]], seconds: float) -> dict:
  """Per-second rates of `batches` produced in `seconds`: batches, examples (packed
  segments), non-padding tokens and positions over all features' token arrays."""
  tokens = [k for k in ("encoder_input_tokens", "decoder_target_tokens") if k in batches[0]]
  examples = sum(int(b["decoder_segment_ids"].max(axis=1).sum()) for b in batches)
  non_padding = sum(int((b[k] != 0).sum()) for b in batches for k in tokens)
  positions = sum(b[k].size for b in batches for k in tokens)
  return {"batches_per_s": len(batches) / seconds, "examples_per_s": examples / seconds,
          "tokens_per_s": non_padding / seconds, "positions_per_s": positions / seconds,
          "examples_per_row": examples / sum(len(b[tokens[0]]) for b in batches),
          "non_padding_fraction": {k: sum(int((b[k] != 0).sum()) for b in batches) /
                                   sum(b[k].size for b in batches) for k in tokens}}


def time_pipeline(args) -> tuple[dict, dict[str, np.ndarray]]:
  start = time.perf_counter()
  ds = ul2x.tasks.get_dataset(args.mixture, args.lengths, "train", args.batch_size,
                              architecture=args.architecture, seed=0)
  built = time.perf_counter()
  it = ds.as_numpy_iterator()
  first = next(it)
  first_batch = time.perf_counter()
  for _ in range(args.warmup_batches):
    next(it)
  start_timed = time.perf_counter()
  batches = [next(it) for _ in range(args.batches)]
  result = pipeline_rates(batches, time.perf_counter() - start_timed)
  result.update(build_s=built - start, first_batch_s=first_batch - built)
  return result, first


def time_train_step(args, batch: dict[str, np.ndarray]) -> dict:
  """Step time on `batch` repeated and fed from a fresh pipeline (see module docstring),
  measured in alternating rounds so that load from elsewhere hits both alike."""
  cfg = TransformerConfig()
  job = setup(cfg, mesh=partitioning.create_mesh(data=4, fsdp=2),
              optimizer=create_optimizer(1000))
  state = job.init_state()
  step = job.train_step()
  put = job.global_batch
  fixed = put(batch)
  it = ul2x.tasks.get_dataset(args.mixture, args.lengths, "train", args.batch_size,
                              architecture=args.architecture, seed=1).as_numpy_iterator()
  feeds = {"train_step": lambda: fixed, "fed_train_step": lambda: put(next(it))}
  for _ in range(args.warmup_batches):  # compile, warm up, fill the pipeline's buffers
    for feed in feeds.values():
      state, metrics = step(state, feed())
  jax.block_until_ready(metrics)
  times = {name: [] for name in feeds}
  for _ in range(args.rounds):
    for name, feed in feeds.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, feed())
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / args.steps)
  return {name: {"step_s": float(np.median(t)), "batches_per_s": 1 / float(np.median(t)),
                 "rounds_step_s": t} for name, t in times.items()}


def _timed(make_batch) -> tuple[float, dict[str, np.ndarray]]:
  start = time.perf_counter()
  batch = make_batch()
  return time.perf_counter() - start, batch


def time_resume(args) -> list[dict]:
  """Per position: seconds from building the stream to its first batch when restored,
  replayed and fresh; the state's bytes; the rate at which the position was reached."""
  mesh = partitioning.create_mesh(data=-1)

  def stream():
    return DataStream(args.mixture, args.lengths, "train", batch_size=args.batch_size,
                      data_shards=1, sharding=NamedSharding(mesh, PartitionSpec("data")),
                      architecture=args.architecture, pack=True, seed=0)

  def restored(directory):
    s = stream()
    s.restore(directory)
    return next(s)

  def replayed(position):
    s = stream()
    s.replay({"train_batches": position, "process_count": 1})
    return next(s)

  next(stream())  # tasks checked once per process, as in a job: not part of a resume
  results = []
  for position in args.positions:
    with tempfile.TemporaryDirectory() as directory:
      straight = stream()
      start = time.perf_counter()
      for _ in range(position):
        next(straight)
      reach_s = time.perf_counter() - start
      straight.save(directory)
      expected = next(straight)
      state_bytes = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
      rounds = {"fresh_start_s": [], "restore_s": [], "replay_s": []}
      for _ in range(args.rounds):  # interleaved, so that load from elsewhere hits all alike
        for name, make_batch in (("fresh_start_s", lambda: next(stream())),
                                 ("restore_s", lambda: restored(directory)),
                                 ("replay_s", lambda: replayed(position))):
          seconds, batch = _timed(make_batch)
          rounds[name].append(seconds)
          if name != "fresh_start_s":
            for feature, rows in expected.items():
              np.testing.assert_array_equal(batch[feature], rows, err_msg=f"{name} {feature}")
    results.append({"position": position,
                    **{name: float(np.median(t)) for name, t in rounds.items()},
                    "state_bytes": state_bytes, "reach_batches_per_s": position / reach_s,
                    "rounds": rounds})
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mixture", default=ul2x.tasks.UL2_MIXTURE_NAME)
  parser.add_argument("--model_gin", default="gin_configs/models/tiny.gin")
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--targets", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--batches", type=int, default=300, help="timed pipeline batches")
  parser.add_argument("--warmup_batches", type=int, default=20)
  parser.add_argument("--steps", type=int, default=20, help="timed train steps per round")
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per feed")
  parser.add_argument("--mode", choices=("steps", "resume"), default="steps",
                      help="steps: pipeline and train step rates; resume: resume times")
  parser.add_argument("--positions", type=int, nargs="+", default=[10, 5000],
                      help="--mode=resume: batches read before each resume")
  args = parser.parse_args()
  gin.parse_config_file(os.path.join(gin_setup.PACKAGE_DIR, args.model_gin))
  args.architecture = TransformerConfig().architecture
  args.lengths = {"inputs": args.inputs, "targets": args.targets}
  if args.mode == "resume":
    resumes = time_resume(args)
    last = resumes[-1]  # replay beyond a fresh start: generating the dropped batches
    per_batch = (last["replay_s"] - last["fresh_start_s"]) / last["position"]
    print(json.dumps({
        "bench": "input_pipeline_resume", "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "mixture": args.mixture, "architecture": args.architecture,
        "task_feature_lengths": args.lengths, "batch_size": args.batch_size, "pack": True,
        "resumes": resumes, "replay_s_per_batch": per_batch,
        "replay_s_at_1M_extrapolated": last["fresh_start_s"] + per_batch * 1_000_000,
    }, indent=2))
    return

  pipeline, batch = time_pipeline(args)
  steps = time_train_step(args, batch)
  print(json.dumps({
      "bench": "input_pipeline", "machine": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(), "num_devices": jax.device_count(),
      "mixture": args.mixture, "model": args.model_gin, "architecture": args.architecture,
      "task_feature_lengths": args.lengths, "batch_size": args.batch_size, "pack": True,
      "pipeline": pipeline, **steps,
      "pipeline_batches_per_train_step": pipeline["batches_per_s"] * steps["train_step"]["step_s"],
      "fed_over_fixed_step_time": steps["fed_train_step"]["step_s"] / steps["train_step"]["step_s"],
  }, indent=2))


if __name__ == "__main__":
  main()
