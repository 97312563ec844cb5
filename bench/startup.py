"""Times the jobs' start-up as a user meets it; prints JSON.

Per job (train, infer, eval, export): the seconds from starting `python -m ul2x.<job>`
to its exit on a config error that gin's parser alone can tell (an unset required macro;
a binding that does not parse), to its exit on an unknown parameter (read from the
configurables' source, also before the imports), and to its first line on
stdout in a run that works. Against `python -c "import jax"` and `python -c "import
seqio"` in the same run. The median of --repeats runs each, one process at a time, on 2
simulated CPU devices; infer, eval and export read a 2-step tiny run trained first (whose
train command is the timed train job). Run from the repository root:

  .venv/bin/python bench/startup.py
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
           JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
MODEL = "--gin_file=gin_configs/models/tiny.gin"
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"
TASK = "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'"


def commands(run_dir: str) -> dict:
  """{job: (working argv, the required macro binding to leave out, unknown parameter)}."""
  checkpoint = f"--gin.CHECKPOINT_PATH='{run_dir}'"
  return {
      "train": ([MODEL, "--gin_file=gin_configs/runs/pretrain.gin", LENGTHS, TASK,
                 f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
                 "--gin.train.log_every=1", "--gin.train.eval_every=0"],
                "--gin.TRAIN_STEPS=2", "--gin.train.bogus=1"),
      "infer": ([MODEL, "--gin_file=gin_configs/runs/infer.gin", LENGTHS, TASK, checkpoint,
                 f"--gin.INFER_OUTPUT_DIR='{run_dir}/infer'", "--gin.infer.num_examples=4",
                 "--gin.infer.overwrite=True"], checkpoint, "--gin.infer.bogus=1"),
      "eval": ([MODEL, "--gin_file=gin_configs/runs/eval.gin", LENGTHS, TASK, checkpoint,
                f"--gin.EVAL_OUTPUT_DIR='{run_dir}/eval'", "--gin.evaluate.num_examples=4"],
               checkpoint, "--gin.evaluate.bogus=1"),
      "export": ([MODEL, "--gin_file=gin_configs/runs/export.gin", checkpoint,
                  f"--gin.EXPORT_DIR='{run_dir}/export'", "--gin.export.format='safetensors'",
                  "--gin.export.overwrite=True"], checkpoint, "--gin.export.bogus=1"),
  }


def module(job: str) -> str:
  return "ul2x.export" if job == "export" else f"ul2x.{job}"


def to_exit(argv: list[str]) -> tuple[float, str]:
  """(seconds until the process exits, its last stderr line)."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV)
  seconds = time.perf_counter() - start
  return seconds, (result.stderr.strip().splitlines() or [""])[-1]


def to_first_line(argv: list[str], wait: bool) -> tuple[float, str]:
  """(seconds until the process prints its first stdout line, that line); the process is
  stopped there unless `wait` (then it must succeed)."""
  start = time.perf_counter()
  process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
  line = process.stdout.readline()
  seconds = time.perf_counter() - start
  if wait:
    _, err = process.communicate()
    if process.returncode:
      raise SystemExit(f"{argv} failed:\n{err[-2000:]}")
  else:
    process.kill()
    process.communicate()
  return seconds, line.rstrip("\n")


def median(runs) -> dict:
  return {"s": round(statistics.median(s for s, _ in runs), 2),
          "runs_s": [round(s, 2) for s, _ in runs], "says": runs[-1][1]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  repeats = parser.parse_args().repeats
  result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "repeats": repeats,
            "baseline": {}, "jobs": {}}
  for name in ("jax", "seqio"):
    result["baseline"][f"import {name}"] = median(
        [to_exit(["-c", f"import {name}"]) for _ in range(repeats)])
  with tempfile.TemporaryDirectory() as run_dir:
    jobs = commands(run_dir)
    to_first_line(["-m", "ul2x.train", *jobs["train"][0]], wait=True)  # the checkpoint
    for job, (argv, required, unknown) in jobs.items():
      command = ["-m", module(job)]
      missing = [a for a in argv if a != required]
      broken = argv + [required.split("=")[0] + "=[1,"]
      # Each timed train run starts a MODEL_DIR of its own, as a new run does.
      fresh = [[a.replace(run_dir, f"{run_dir}/train{i}") for a in argv] if job == "train"
               else argv for i in range(repeats)]
      result["jobs"][job] = {
          "unset_required_macro": median([to_exit(command + missing) for _ in range(repeats)]),
          "binding_syntax_error": median([to_exit(command + broken) for _ in range(repeats)]),
          "unknown_parameter": median(
              [to_exit(command + argv + [unknown]) for _ in range(repeats)]),
          "first_line": median([to_first_line(command + a, wait=False) for a in fresh]),
      }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
