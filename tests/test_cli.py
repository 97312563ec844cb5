"""The `python -m ul2x.train` command line: an end-to-end run (a subprocess) and one-line
config errors (in this process, as the command runs them)."""

import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from cli_utils import cpu_env, one_line_error, run_job

BASE = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
        "--gin.TRAIN_STEPS=4", "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--gin.BATCH_SIZE=8",
        "--gin.train.log_every=2", "--gin.train.eval_every=4", "--gin.train.eval_batches=1"]


def train_cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "ul2x.train", *args], capture_output=True,
                        text=True, env=cpu_env(8), cwd=cwd, timeout=300)


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
    (BASE + ["--gin.TRAIN_STEPS='abc'"], "train.train_steps='abc' must be an integer"),
    (BASE + ["--gin.TRAIN_STEPS=abc"], "Failed to parse token 'abc'"),
    (BASE + ["--gin.MIXTURE_OR_TASK_NAME='nope'"], "unknown seqio task or mixture 'nope'"),
    (BASE + ["--gin.learning_rate_schedule.learning_rate=-0.01"],
     "learning_rate_schedule.learning_rate=-0.01 must be a number in (0, 3.4"),
    (BASE + ["--gin.learning_rate_schedule.learning_rate=0"], "learning_rate=0 must be"),
    (BASE + ["--gin.learning_rate_schedule.learning_rate=1e39"], "learning_rate=1e+39 must"),
    (BASE + ["--gin.learning_rate_schedule.warmup_steps=-5"],
     "warmup_steps=-5 must be an integer in [0, inf)"),
    (BASE + ["--gin.create_optimizer.grad_clip_norm=0"],
     "grad_clip_norm=0 must be a number in (0, inf)"),
    (BASE + ["--gin.create_optimizer.weight_decay=-1e-4"], "weight_decay=-0.0001 must"),
    (BASE + ["--gin.train.z_loss=-1"], "train.z_loss=-1 must be a number in [0, inf)"),
    (BASE + ["--gin.train.num_microbatches=0"],
     "train.num_microbatches=0 must be an integer in [1"),
    (BASE + ["--gin.TransformerConfig.dropout_rate=1.0"],
     "TransformerConfig.dropout_rate=1.0 must be a number in [0, 1)"),
    (BASE + ["--gin.TransformerConfig.num_experts=2",
             "--gin.TransformerConfig.capacity_factor=-1.0"],
     "TransformerConfig.capacity_factor=-1.0 must be a number in (0, inf)"),
], ids=["missing_macro", "unknown_binding", "mesh_mismatch", "unknown_flag", "steps_string",
        "steps_syntax", "unknown_task", "lr_negative", "lr_zero", "lr_overflow", "warmup",
        "clip", "weight_decay", "z_loss", "microbatches", "dropout", "capacity"])
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


# A user's task module (docs/data.md): a mixture of a task over text files that are there
# and one whose `train` or `validation` files are not.
MISSING_TASKS = textwrap.dedent('''\
    import seqio  # after NAME, TEXT, BAD, set by the test
    from ul2x.tasks import preprocessors, registry

    for task, files in ((f"{NAME}_good", {"train": TEXT, "validation": TEXT}),
                        (f"{NAME}_bad", BAD)):
      registry.register_denoising_task(task, seqio.TextLineDataSource(files),
                                       preprocessors.prefix_lm)
    seqio.MixtureRegistry.add(f"{NAME}_mix", [f"{NAME}_good", f"{NAME}_bad"], default_rate=1.0)
''')


@pytest.mark.parametrize("case", ["train", "validation", "broken_link"])
def test_missing_data_file_is_one_line_before_model_dir(case, tmp_path, monkeypatch):
  """A file the task reads that is not there (the train split, the eval split, a link
  to nothing that a glob matches) stops train at start-up with one line naming the
  path and the member task, and nothing is written; eval and infer read tasks the same
  way (inference.task_examples)."""
  from ul2x.tasks import inference
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
  missing = tmp_path / "no_such_dir" / "missing.txt"
  (tmp_path / "link-00.txt").symlink_to(missing)
  bad = {"train": str(missing if case == "train" else text),
         "validation": str(missing if case == "validation" else text)}
  split = "validation" if case == "validation" else "train"
  if case == "broken_link":
    bad["train"] = str(tmp_path / "link-*.txt")
  name = f"cli_missing_{case}"
  (tmp_path / f"{name}.py").write_text(
      f"NAME, TEXT, BAD = {name!r}, {str(text)!r}, {bad!r}\n" + MISSING_TASKS)
  (tmp_path / f"{name}.gin").write_text(f"import {name}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  model_dir = tmp_path / "run"
  args = [a for a in BASE if "MIXTURE_OR_TASK_NAME" not in a]
  result = run_job("train", *args, f"--gin_file={tmp_path / name}.gin",
                   f"--gin.MIXTURE_OR_TASK_NAME='{name}_mix'", f"--gin.MODEL_DIR='{model_dir}'")
  where = f"task '{name}_bad' split '{split}'"
  if case == "broken_link":
    expected = [where, f"cannot read its data ({tmp_path}/link-00.txt; No such file"]
  else:
    expected = [f"{where} reads '{missing}', which matches no file; check the path"]
  one_line_error(result, *expected)
  assert not model_dir.exists()
  with pytest.raises(ValueError, match=re.escape(expected[-1])):
    inference.task_examples(f"{name}_bad", split, {"inputs": 32, "targets": 16})
