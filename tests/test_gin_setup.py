"""The jobs' start-up (gin_setup.py): config errors that gin's parser alone can tell come
before the seconds of importing jax, TensorFlow and seqio, and a job's console at the
default verbosity holds its own lines only."""

import argparse
import os
import pathlib
import subprocess
import sys

import pytest
from cli_utils import cpu_env

from ul2x import gin_setup

ENV = cpu_env(2)
TINY = "--gin_file=gin_configs/models/tiny.gin"
# Each job with a config error of another kind; the script prints the heavy modules
# imported by the time all of them have failed.
BAD = [
    ("ul2x.infer", [TINY, "--gin_file=gin_configs/runs/infer.gin"]),
    ("ul2x.train", [TINY, "--gin_file=gin_configs/runs/pretrain.gin", "--gin.TRAIN_STEPS=[1,"]),
    ("ul2x.eval", [TINY, "--gin_file=nope.gin"]),
    ("ul2x.export.__main__", [TINY, "--gin_file=gin_configs/runs/export.gin",
                              "--gin.CHECKPOINT_PATH=/tmp/x"]),
    ("ul2x.infer", [TINY, "--gin_file=gin_configs/runs/infer.gin", "--gin.infer.bogus=1"]),
    ("ul2x.train", [TINY, "--gin_file=gin_configs/runs/pretrain.gin",
                    "--gin.TransformerConfig.emb_dims=64"]),
]
SEARCH = list(dict.fromkeys([os.getcwd(), gin_setup.PACKAGE_DIR]))
SCRIPT = f"""
import importlib, sys
from ul2x import gin_setup
for job, argv in {BAD!r}:
  try:
    gin_setup.run_cli(importlib.import_module(job).main, argv)
  except SystemExit as e:
    assert e.code == 2, (job, e.code)
print(sorted(m for m in ("jax", "seqio", "tensorflow") if m in sys.modules))
"""


def test_config_errors_come_before_the_heavy_imports():
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=ENV, timeout=120)
  assert result.returncode == 0 and result.stdout == "[]\n", result.stderr[-2000:]
  assert result.stderr.splitlines() == [
      "error: required macro CHECKPOINT_PATH is not set; pass --gin.CHECKPOINT_PATH=VALUE.",
      "error: gin: cannot parse the binding 'TRAIN_STEPS = [1,' (it ends inside a "
      "bracket or string); check its quotes and brackets: --gin.NAME=VALUE, a string as \"'text'\".",
      f"error: gin file 'nope.gin' not found in {SEARCH}; check "
      "--gin_file or add its directory to --gin_search_paths.",
      "error: gin: cannot parse the binding 'CHECKPOINT_PATH = /tmp/x' (Unable to parse "
      "value); check its quotes and brackets: --gin.NAME=VALUE, a string as \"'text'\".",
      "error: gin: Configurable 'infer' doesn't have a parameter named 'bogus'. In bindings "
      "string line 1 infer.bogus = 1",
      "error: gin: Configurable 'TransformerConfig' doesn't have a parameter named "
      "'emb_dims'. In bindings string line 1 TransformerConfig.emb_dims = 64",
  ]


def test_the_source_read_of_parameters_accepts_every_gin_file_of_ours():
  """`check_config`'s unknown-parameter check reads our configurables from their source:
  every binding in gin_configs/ passes it, and a wrong name in a file is named there."""
  read = gin_setup._Read()
  for path in sorted(pathlib.Path(gin_setup.PACKAGE_DIR, "gin_configs").rglob("*.gin")):
    assert gin_setup._read_file(str(path), [gin_setup.PACKAGE_DIR], read), path
  assert len(read.parameters) > 50
  gin_setup._check_parameters(read.parameters, {})
  configurables = gin_setup._static_configurables()
  assert {"train", "TransformerConfig", "create_mesh", "export", "LmEvalHook"} <= set(configurables)


def test_a_wrong_parameter_in_a_file_is_named_before_the_imports(tmp_path):
  (tmp_path / "typo.gin").write_text("A = 1\nscoped/create_mesh.dta = 2\nother.x = 1\n")
  with pytest.raises(gin_setup.ConfigError, match=(
      r"gin: Configurable 'create_mesh' doesn't have a parameter named 'dta'. In file "
      rf"\"{tmp_path}/typo.gin\", line 2 scoped/create_mesh.dta = 2")):
    gin_setup.check_config(_args(tmp_path, "typo.gin"))
  # Not ours (left to gin's full parse), and a job's own function passed as `known`.
  gin_setup.check_config(_args(tmp_path, bindings=["other.x = 1", "create_mesh.data = 2"]))
  with pytest.raises(gin_setup.ConfigError, match="'job' doesn't have a parameter named 'y'"):
    gin_setup.check_config(_args(tmp_path, bindings=["job.y = 1"]), known={"job": {"x"}})


def _args(tmp_path, *gin_files, bindings=(), required=()):
  """Flags for `gin_files` after a run file that declares the `required` macros."""
  (tmp_path / "required.gin").write_text("".join(f"{n} = %gin.REQUIRED\n" for n in required))
  return argparse.Namespace(gin_file=[str(tmp_path / f) for f in ("required.gin", *gin_files)],
                            gin_bindings=list(bindings), gin_search_paths=str(tmp_path))


def test_required_macros_are_read_without_the_configurables(tmp_path):
  """Includes, macros bound to macros, scopes, bindings over files: as gin reads them."""
  (tmp_path / "run.gin").write_text(
      "include 'base.gin'\nimport not_a_module\nA = %B\nscoped/C = 1\n"
      "not_ours.x = @not_registered()\n")
  (tmp_path / "base.gin").write_text("B = %gin.REQUIRED\nC = %gin.REQUIRED\nD = None\n")
  check = gin_setup.check_config
  for required, bindings, unset in [(("A",), (), "A"), (("C",), (), "C"),
                                    (("D",), (), "D"), (("E",), (), "E"),
                                    (("A", "C"), ("B = 'b'",), "C")]:
    with pytest.raises(gin_setup.ConfigError, match=f"required macro {unset} is not set"):
      check(_args(tmp_path, "run.gin", bindings=bindings, required=required))
  check(_args(tmp_path, "run.gin", bindings=["B = 'b'", "C = 0", "D = @x()"],
              required=("A", "C", "D")))
  # A run file's declared requirement counts where the run file declares it.
  check(_args(tmp_path, "base.gin", bindings=["B = 1", "C = 1"]))
  (tmp_path / "finetune.gin").write_text("INITIAL_CHECKPOINT_PATH = %gin.REQUIRED\n")
  with pytest.raises(gin_setup.ConfigError, match="INITIAL_CHECKPOINT_PATH is not set"):
    check(_args(tmp_path, "finetune.gin"))
  # Syntax errors: the file and line; an include not found here is left to gin's parse.
  (tmp_path / "bad.gin").write_text("A = 1\nB = [1,\n")
  with pytest.raises(gin_setup.ConfigError, match="bad.gin ends inside a bracket"):
    check(_args(tmp_path, "bad.gin"))
  (tmp_path / "lost.gin").write_text("include 'nowhere.gin'\n")
  check(_args(tmp_path, "lost.gin", required=("A",)))


def test_a_bad_export_command_prints_one_line():
  """The export job imports TensorFlow with its configurables, after the start-up
  silenced seqio's import: its C++ start-up lines must not come through either."""
  result = subprocess.run(
      [sys.executable, "-m", "ul2x.export", TINY, "--gin_file=gin_configs/runs/export.gin",
       "--gin.CHECKPOINT_PATH='/nonexistent'", "--gin.EXPORT_DIR='/nonexistent/out'",
       "--gin.export.format='onnx'"], capture_output=True, text=True, env=ENV, timeout=300)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "error: export.format='onnx' is not one of ('hf', 'safetensors', 'serving'); set "
      "--gin.export.format to one of them."], result.stderr
