"""The `python -m ul2x.train` command line: an end-to-end run (a subprocess) and one-line
config errors (in this process, as the command runs them)."""

import os
import socket
import subprocess
import sys
import time

import pytest
from cli_utils import one_line_error, run_job

BASE = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
        "--gin.TRAIN_STEPS=4", "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--gin.BATCH_SIZE=8",
        "--gin.train.log_every=2", "--gin.train.eval_every=4", "--gin.train.eval_batches=1"]


def train_cli(*args, cwd=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ul2x.train", *args], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=300)


def test_cli_trains_and_writes_model_dir(tmp_path):
  # Run from an unrelated directory: gin files resolve against the package.
  result = train_cli(*BASE, f"--gin.MODEL_DIR='{tmp_path}'", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "step 4/4" in result.stdout and "eval step 4" in result.stdout
  assert f"checkpoints: {tmp_path}/checkpoints" in result.stdout
  assert "Path not found" not in result.stderr
  for noise in ("oneDNN", "cuda drivers", "uncached FunctionDataset"):  # --verbosity=0
    assert noise not in result.stderr + result.stdout, noise
  config = (tmp_path / "config.gin").read_text()
  assert "train.train_steps = %TRAIN_STEPS" in config and "TRAIN_STEPS = 4" in config
  assert os.listdir(tmp_path / "checkpoints" / "4")


@pytest.mark.parametrize("args, expected", [
    ([a for a in BASE if "TRAIN_STEPS" not in a],
     "required macro TRAIN_STEPS is not set; pass --gin.TRAIN_STEPS=VALUE"),
    (BASE + ["--gin.train.no_such_setting=1"], "no_such_setting"),
    (BASE + ["--gin.create_mesh.data=3"], "has 3 devices but there are 8"),
    (BASE + ["--no_such_flag=1"], "unknown flag"),
    (BASE + ["--gin.TRAIN_STEPS='abc'"], "train.train_steps='abc' is not an integer"),
    (BASE + ["--gin.TRAIN_STEPS=abc"], "Failed to parse token 'abc'"),
    (BASE + ["--gin.MIXTURE_OR_TASK_NAME='nope'"], "unknown seqio task or mixture 'nope'"),
], ids=["missing_macro", "unknown_binding", "mesh_mismatch", "unknown_flag", "steps_string",
        "steps_syntax", "unknown_task"])
def test_config_errors_are_one_line(args, expected, tmp_path):
  model_dir = tmp_path / "run"
  one_line_error(run_job("train", *args, f"--gin.MODEL_DIR='{model_dir}'"), expected)
  assert not model_dir.exists()  # nothing is written before the config and data check out


def test_unwritable_model_dir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  one_line_error(run_job("train", *BASE, f"--gin.MODEL_DIR='{tmp_path}/file/run'"),
                 "cannot write MODEL_DIR", "Not a directory")


@pytest.mark.parametrize("index", [0, 1], ids=["coordinator", "peer"])
def test_a_process_that_never_joins_is_one_line_within_the_timeout(index, tmp_path):
  with socket.socket() as s:  # a free local port: nobody else is the coordinator
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  result = train_cli(*BASE, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--process_count=2",
                     f"--process_index={index}", f"--coordinator_address=127.0.0.1:{port}",
                     "--distributed_timeout=3")
  one_line_error(result, f"process {index} of 2", f"127.0.0.1:{port}")
  assert time.monotonic() - start < 60
