"""Running a job's command line in this process, as `python -m ul2x.<job>` would
(`gin_setup.run_cli(main, argv)`), and checking its one-line errors. A cold subprocess
costs seconds of imports; one real subprocess per entry point stays in the suite."""

import contextlib
import importlib
import io
import json
import os
import re
import subprocess

import gin

from ul2x import gin_setup

JOBS = {"train": "ul2x.train", "infer": "ul2x.infer", "eval": "ul2x.eval",
        "export": "ul2x.export.__main__", "import_hf": "ul2x.import_hf",
        "lm_eval": "ul2x.lm_eval"}


def cpu_env(devices: int = 8, **extra: str) -> dict:
  """The environment of a job's subprocess: this one's (tests/conftest.py's XLA flags, so
  the numbers equal this process's) with `devices` simulated CPU devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  return dict(os.environ, JAX_PLATFORMS="cpu", **extra,
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")


def run_job(job: str, *argv) -> subprocess.CompletedProcess:
  """`python -m ul2x.<job> ARGV` in this process, gin cleared before and after;
  -> its exit status, stdout and stderr."""
  main = importlib.import_module(JOBS[job]).main
  out, err = io.StringIO(), io.StringIO()
  gin.clear_config()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        gin_setup.run_cli(main, [str(a) for a in argv])
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
  finally:
    gin.clear_config()
  return subprocess.CompletedProcess([job, *argv], code, out.getvalue(), err.getvalue())


def one_line_error(result, *fragments) -> str:
  """The job exited 2 with one `error:` line and no traceback, holding every fragment."""
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def rows(path) -> list[dict]:
  """The rows of a job's JSONL output (infer's predictions, eval's metrics)."""
  with open(path) as f:
    return [json.loads(line) for line in f]
