"""The training job: checkpoints, exact resume (state and data position), keep-N,
non-finite steps, and preemption by SIGTERM and SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ul2x.tasks  # noqa: F401  registers the default tasks
from ul2x.model import TransformerConfig
from ul2x.model.flops import training_flops_per_example
from ul2x.trainer import integrity, loop
from ul2x.trainer.loop import train

from cli_utils import cpu_env, one_line_error, run_job

CFG = TransformerConfig(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                        num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)


def run(model_dir, steps, **kw):
  args = dict(model_dir=str(model_dir), train_steps=steps,
              mixture_or_task_name="ul2x_span_corruption",
              task_feature_lengths={"inputs": 32, "targets": 16}, model_config=CFG,
              batch_size=8, log_every=2, eval_every=3, eval_batches=1, checkpoint_every=3,
              keep_checkpoints=2)
  return train(**{**args, **kw})


def saved(model_dir, step):
  manager = ocp.CheckpointManager(os.path.join(model_dir, "checkpoints"))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return jax.device_get(restored["state"]), restored["data"]


PEAK_FLOPS = 1e9  # per device, in place of the measured matmul rate, so MFU can be checked


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("straight")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, "peak_flops_per_device", lambda: PEAK_FLOPS)
    start = time.perf_counter()
    metrics = run(model_dir, 8, profile_steps=(2, 3))
    metrics["wall_time"] = time.perf_counter() - start
  return model_dir, metrics


def test_outputs_and_keep_n(uninterrupted):
  model_dir, metrics = uninterrupted
  steps = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints"))
                 if d.isdigit())
  assert steps == [6, 8]  # saved at 3, 6 and the final 8; keep 2
  for sub in ("train", "eval"):
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(model_dir, sub)))
  for key in ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
    assert np.isfinite(metrics[key]), key
  # MFU = analytic training FLOPs of the step's 8 examples / measured step time / peak.
  assert 0 < metrics["step_time"] < metrics["wall_time"] / 2  # 2 steps per report
  flops = 8 * training_flops_per_example(CFG, {"encoder_input_tokens": 32,
                                               "decoder_input_tokens": 16})
  assert metrics["mfu"] == pytest.approx(
      flops / metrics["step_time"] / (PEAK_FLOPS * jax.device_count()), rel=1e-6)
  assert metrics["tokens_per_second"] == pytest.approx(8 * (32 + 16) / metrics["step_time"],
                                                       rel=1e-6)


def test_model_info_and_profile(uninterrupted, tmp_path):
  model_dir, _ = uninterrupted
  info = (model_dir / "model-info.txt").read_text().splitlines()
  assert info[0] == "# mesh: data=8 fsdp=1 expert=1 sequence=1 tensor=1 (8 devices)"
  wo = next(line for line in info if line.startswith("params/decoder/layers/0/mlp/wo/kernel "))
  assert wo.split()[-2:] == [str(64 * 32 * 4)] * 2  # pure data parallel: whole on each device
  assert any(line.startswith("opt_state/") for line in info)
  traces = [f for _, _, files in os.walk(model_dir / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  with pytest.raises(ValueError, match=r"train.profile_steps=\(3, 2\) is not \(first, last\)"):
    run(tmp_path, 8, profile_steps=(3, 2))
  assert not os.listdir(tmp_path)


def test_finished_job_does_nothing(uninterrupted, capsys):
  model_dir, _ = uninterrupted
  assert run(model_dir, 8) == {}
  assert "already trained to step 8" in capsys.readouterr().out


def finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


def test_nonfinite_steps_are_skipped_or_stop_and_are_never_saved(tmp_path):
  """A rate of 3e38 (finite in float32) keeps step 1's loss and gradients finite but
  overflows the updated parameters (the issue's command, which saved a checkpoint of inf
  as good): 'skip' saves only finite steps, counting the skipped ones; resumed with
  'stop', the job ends before its next save, naming the newest (good) checkpoint."""
  flags = [f for f in cli(tmp_path, checkpoint_every=1)[3:] if "TransformerConfig" not in f]
  flags += ["--gin.learning_rate_schedule.learning_rate=3e38",
            "--gin.learning_rate_schedule.warmup_steps=1"]
  result = run_job("train", *flags, "--gin.TRAIN_STEPS=2", "--gin.train.on_nonfinite='skip'")
  assert result.returncode == 0 and "skipped " in result.stdout, result.stderr[-2000:]
  steps = lambda: sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps() == [1, 2] and all(finite(saved(tmp_path, s)[0]) for s in steps())
  result = run_job("train", *flags, "--gin.TRAIN_STEPS=4", "--gin.train.on_nonfinite='stop'")
  one_line_error(result, "updated parameters became non-finite between steps 3 and 3; "
                 "stopped without saving, so the newest checkpoint (step 2)")
  assert steps() == [1, 2]


ENV = cpu_env(8)


def cli(model_dir, checkpoint_every: int) -> list:
  """The CLI twin of `run` (same model, optimizer, data and mesh), without TRAIN_STEPS."""
  flags = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
           f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--gin.BATCH_SIZE=8",
           "--gin.train.log_every=1", "--gin.train.eval_every=0",
           f"--gin.train.checkpoint_every={checkpoint_every}"]
  flags += [f"--gin.TransformerConfig.{k}={v}" for k, v in dict(
      emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64, num_encoder_layers=1,
      num_decoder_layers=1, dropout_rate=0.1).items()]
  return [sys.executable, "-m", "ul2x.train", *flags]


# `python -m ul2x.train` whose input reader gets stuck before the third batch.
STUCK_READER = """import sys, time
from ul2x import gin_setup, train
from ul2x.trainer import data
read = data.DataStream.__next__
batches = []
def stuck_reader(stream):
  batches.append(1)
  if len(batches) == 3:
    time.sleep(600)
  return read(stream)
data.DataStream.__next__ = stuck_reader
gin_setup.run_cli(train.main)
"""


def test_a_hung_step_writes_every_stack_and_exits(tmp_path):
  command = [sys.executable, "-c", STUCK_READER, *cli(tmp_path, checkpoint_every=1)[3:],
             "--gin.TRAIN_STEPS=5", "--gin.train.step_timeout_s=3"]
  result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
  hang = tmp_path / "hang-0.txt"
  assert result.returncode == 3, result.stderr[-2000:]
  assert (f"error: no step finished within 3 s after step 2 (train.step_timeout_s); every "
          f"thread's stack is in {hang}") in result.stderr
  stacks = hang.read_text()
  assert "in stuck_reader" in stacks and stacks.count("Thread 0x") >= 2, stacks
  assert "1" in os.listdir(tmp_path / "checkpoints")  # the step-2 save waited for step 1's


def test_sigterm_saves_and_the_rerun_matches_an_uninterrupted_run(uninterrupted, tmp_path):
  """The CLI twin of `run` is stopped by SIGTERM after step 2, then resumed to step 8: its
  state (parameters, optimizer state) and data position equal the uninterrupted run's.
  (Resuming exactly is proved here; the SIGKILL and damage tests check parameters.)"""
  command = cli(tmp_path, checkpoint_every=3)
  process = subprocess.Popen(command + ["--gin.TRAIN_STEPS=1000"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=ENV)
  for line in process.stdout:
    if line.startswith("step 2/1000"):
      process.send_signal(signal.SIGTERM)
      break
  output = process.stdout.read()
  assert process.wait(timeout=300) == 0, output
  stopped = int(output.split("stopped by SIGTERM at step ")[1].split(":")[0])
  assert 2 <= stopped < 8 and saved(tmp_path, stopped)[1] == {
      "train_batches": stopped, "process_count": 1, "data_shards": 1}
  rerun = run_job("train", *command[3:], "--gin.TRAIN_STEPS=8")  # in this process: faster
  assert rerun.returncode == 0 and f"resumed from {tmp_path}/checkpoints at step {stopped}" \
      in rerun.stdout, rerun.stderr[-2000:]
  (a, data_a), (b, data_b) = saved(uninterrupted[0], 8), saved(tmp_path, 8)
  assert data_a == data_b == {"train_batches": 8, "process_count": 1, "data_shards": 1}
  jax.tree.map(np.testing.assert_array_equal, a, b)  # step, parameters, optimizer state


def test_sigkill_at_a_random_moment_then_the_rerun_matches(uninterrupted, tmp_path):
  """SIGKILL at a random moment between steps 3 and 7 of a run that saves every step
  asynchronously (so the kill often lands inside a save): the rerun resumes from the
  newest complete checkpoint and ends with the uninterrupted run's parameters."""
  rng = np.random.default_rng(1)  # a kill 0.48 s after "step 4" is printed
  kill_after, delay = int(rng.integers(3, 7)), float(rng.uniform(0.0, 0.5))
  command = cli(tmp_path, checkpoint_every=1)
  process = subprocess.Popen(command + ["--gin.TRAIN_STEPS=1000"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=ENV)
  for line in process.stdout:
    if line.startswith(f"step {kill_after}/1000"):
      time.sleep(delay)
      process.kill()
      break
  assert process.wait(timeout=300) == -signal.SIGKILL
  rerun = run_job("train", *command[3:], "--gin.TRAIN_STEPS=8")
  resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resumed from")]
  assert rerun.returncode == 0 and resumed, rerun.stderr[-2000:]
  # "step k" is printed after step k-1's save began, which waited for step k-2's.
  assert kill_after - 2 <= int(resumed[0].rsplit(" ", 1)[1]) < 8
  jax.tree.map(np.testing.assert_array_equal, saved(uninterrupted[0], 8)[0]["params"],
               saved(tmp_path, 8)[0]["params"])


def _damage_largest_file(step_dir, garble: bool = False):
  """Truncates the step's largest file to 100 bytes, or (`garble`) overwrites it with
  random bytes of the same size; -> its name relative to `step_dir`."""
  files = [os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    if garble:
      f.write(os.urandom(os.path.getsize(largest)))
    else:
      f.truncate(100)
  return os.path.relpath(largest, step_dir)


def test_damaged_checkpoint_is_named_then_skipped(uninterrupted, tmp_path):
  """Truncated (6), garbled with sizes kept (5: the checksum names the file) and garbled
  before its manifest was written (4: orbax's own error, in one line): train names the
  newest, or falls back through the command line to the newest intact step (3) and
  ends as if never damaged."""
  run(tmp_path, 6, checkpoint_every=1, keep_checkpoints=4)
  steps_dir = tmp_path / "checkpoints"
  truncated = _damage_largest_file(steps_dir / "6")
  garbled = _damage_largest_file(steps_dir / "5", garble=True)
  (steps_dir / "4" / integrity.MANIFEST).unlink()  # as if killed before writing it
  _damage_largest_file(steps_dir / "4", garble=True)
  with pytest.raises(ValueError, match=rf"checkpoint {steps_dir}/6 is damaged: "
                                       rf"file {truncated} has 100 bytes, not the \d+ saved"):
    run(tmp_path, 8, fallback_to_intact_checkpoint=False)
  result = run_job("train", *cli(tmp_path, checkpoint_every=2)[3:], "--gin.TRAIN_STEPS=8",
                   "--gin.train.keep_checkpoints=3")
  assert result.returncode == 0, result.stderr[-2000:]
  warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
  expected = [f"checkpoint {steps_dir}/6 is damaged: file {truncated} has 100 bytes",
              f"checkpoint {steps_dir}/5 is damaged: file {garbled} does not match its checksum",
              f"checkpoint {steps_dir}/4 cannot be read: "]
  assert len(warnings) == 3 and all(e in w for e, w in zip(expected, warnings)), warnings
  assert f"resumed from {steps_dir} at step 3" in result.stdout
  assert {"4.damaged", "5.damaged", "6.damaged", "8"} <= set(os.listdir(steps_dir))
  jax.tree.map(np.testing.assert_array_equal, saved(uninterrupted[0], 8)[0]["params"],
               saved(tmp_path, 8)[0]["params"])
