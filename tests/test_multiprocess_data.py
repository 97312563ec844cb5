"""Two processes of 4 CPU devices joined by jax.distributed train on the same batches as
one process of 8, and each resumes the other's checkpoint; a process that dies during
training is named in one line by the survivor (`python -m ul2x.train`)."""

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from cli_utils import cpu_env, run_job
from etils import epath

pytestmark = pytest.mark.slow

# 12 rows in data_shards=3 seqio shards of 4 rows, on a mesh of 4 batch shards x 2
# tensor: on two processes, process 0 holds rows 0-5 (shard 0 and half of shard 1) and
# process 1 rows 6-11 (the other half of shard 1, and shard 2). So the run covers a
# process reading more than one shard, part of a shard, and a shard that one process
# writes into the checkpoint and two read back.
FLAGS = [
    "--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
    "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--gin.BATCH_SIZE=12",
    "--gin.train.data_shards=3", "--gin.create_mesh.data=4", "--gin.create_mesh.tensor=2",
    "--gin.train.log_every=1", "--gin.train.eval_every=0", "--gin.train.checkpoint_every=2",
    "--gin.TransformerConfig.emb_dim=32", "--gin.TransformerConfig.num_heads=2",
    "--gin.TransformerConfig.head_dim=8", "--gin.TransformerConfig.mlp_dim=64",
    "--gin.TransformerConfig.num_encoder_layers=1", "--gin.TransformerConfig.num_decoder_layers=1"]


def start(model_dir, steps: int, processes: int, *extra: str) -> list[subprocess.Popen]:
  """Starts a train job of `processes` processes with 8 CPU devices in all."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = cpu_env(8 // processes)
  # jax 0.12.1: processes of one job that find their programs in a persistent compilation
  # cache hang (docs/development.md), so these compile afresh.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  command = [sys.executable, "-m", "ul2x.train", *FLAGS, f"--gin.MODEL_DIR='{model_dir}'",
             f"--gin.TRAIN_STEPS={steps}", *extra]
  if processes > 1:
    command += [f"--coordinator_address=127.0.0.1:{port}", f"--process_count={processes}"]
  return [subprocess.Popen(command + ([f"--process_index={i}"] if processes > 1 else []),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for i in range(processes)]


def finish(job: list[subprocess.Popen]) -> str:
  """Waits for every process (killing all on a timeout); -> process 0's stdout."""
  outputs = []
  try:
    for process in job:
      out, err = process.communicate(timeout=600)
      assert process.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for process in job:
      if process.poll() is None:
        process.kill()
  return outputs[0]


def losses(model_dir) -> dict[int, float]:
  """Step -> training loss from the TensorBoard events process 0 wrote."""
  found = {}
  train_dir = os.path.join(model_dir, "train")
  for name in sorted(os.listdir(train_dir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(train_dir, name)):
      for value in event.summary.value:
        if value.tag == "loss":
          found[event.step] = float(tf.make_ndarray(value.tensor))
  return found


def params(model_dir, step: int):
  """The parameters saved at `step`, as numpy arrays (whichever devices wrote them)."""
  path = epath.Path(model_dir) / "checkpoints" / str(step) / "state"
  tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args))["params"]


def resumable_copy(model_dir, to, step: int):
  """A copy of `model_dir` holding only its checkpoint at `step` (and no metrics)."""
  shutil.copytree(os.path.join(model_dir, "checkpoints", str(step)),
                  os.path.join(to, "checkpoints", str(step)))
  return to


def assert_close(a: dict, b: dict):
  """Equal up to the order of cross-process sums (gloo instead of in-process)."""
  assert a.keys() == b.keys(), (a, b)
  np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)


def train_here(model_dir, steps: int) -> str:
  """The one-process job, run in this process (8 devices) while a two-process job runs."""
  result = run_job("train", *FLAGS, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_two_processes_train_and_resume_like_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  two_job = start(two, 2, 2)
  out_one, out_two = train_here(one, 4), finish(two_job)
  assert "step 4/4" in out_one and "step 2/2" in out_two
  reference = losses(one)
  assert_close(losses(two), {s: reference[s] for s in (1, 2)})

  two_on_one = resumable_copy(two, tmp_path / "two_on_one", 2)
  one_on_two = resumable_copy(one, tmp_path / "one_on_two", 2)
  one_on_two_job = start(one_on_two, 4, 2)
  outputs = train_here(two_on_one, 4), finish(one_on_two_job)
  for out, model_dir, writers in zip(outputs, (two_on_one, one_on_two), (2, 1)):
    assert f"resumed from {model_dir}/checkpoints at step 2" in out, out
    assert f"written by {writers} process(es)" in out and "continue unchanged" in out, out
    assert_close(losses(model_dir), {s: reference[s] for s in (3, 4)})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 params(one, 4), params(model_dir, 4))


def test_a_process_that_dies_during_training_is_named_in_one_line(tmp_path):
  """SIGKILL process 1 after step 2: process 0, blocked in its next collective, exits
  with status 2 and one line naming process 1 and the coordinator within --peer_timeout
  (instead of JAX's abort after its heartbeat timeout)."""
  survivor, victim = start(tmp_path / "run", 1000, 2, "--peer_timeout=10")
  try:
    for line in survivor.stdout:
      if line.startswith("step 2/1000"):
        victim.kill()
        break
    killed = time.monotonic()
    _, err = survivor.communicate(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for process in (survivor, victim):
      if process.poll() is None:
        process.kill()
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert survivor.returncode == 2 and len(errors) == 1, err[-3000:]
  assert "process 0 of 2" in errors[0] and "from process 1" in errors[0], errors[0]
  assert "127.0.0.1:" in errors[0] and waited < 60, (errors[0], waited)
