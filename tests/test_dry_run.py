"""The train job's dry run: its bytes per device against the real state's shards and
XLA's count, the fit verdict, and the CLI's exit status with nothing written."""

import dataclasses
import importlib.util
import itertools
import os
import subprocess
import sys

import jax
import pytest

from ul2x import partitioning
from ul2x.partitioning import report, topologies
from ul2x.tasks import pipeline
from ul2x.trainer import dry_run, loop
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup
import compilers
from cli_utils import cpu_env, one_line_error, run_job
from train_utils import TINY

LENGTHS = {"inputs": 16, "targets": 8}
BATCH = 8


@pytest.fixture(scope="module")
def measured():
  job = setup(TINY, mesh=partitioning.create_mesh(data=2, fsdp=2, tensor=2),
              optimizer=create_optimizer(10, name="adamw"))
  return job, dry_run.measure(job, batch_size=BATCH, task_feature_lengths=LENGTHS,
                              step_options={}, peak_tflops=1.0)


def _held(tree, device) -> int:
  """Bytes of `tree`'s real arrays that live on `device`."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)


def test_bytes_per_device_equal_the_real_state_shards(measured):
  job, r = measured
  state = job.init_state()
  whole = sum(report.global_bytes(x) for x in jax.tree.leaves(state["params"]))
  assert 0 < r["params_bytes"] < whole / 2  # really sharded (fsdp x tensor)
  for device in job.mesh.devices.flat:
    assert _held(state["params"], device) == r["params_bytes"]
    assert _held(state["opt_state"], device) == r["opt_state_bytes"]
  # XLA's own count: the donated state (and its int32 step) is reused whole by the outputs;
  # the arguments add the batch's shards (of the features the step reads: jit drops others).
  state_bytes = r["params_bytes"] + r["opt_state_bytes"] + 4
  assert r["aliased_bytes"] == state_bytes
  lengths = pipeline.feature_lengths_for(TINY.architecture, LENGTHS)
  batch = sum(report.device_bytes(x, x.sharding)
              for x in job.abstract_batch(BATCH, lengths).values())
  assert state_bytes < r["arguments_bytes"] <= state_bytes + batch
  assert r["temp_bytes"] > 0 and r["total_bytes"] > r["arguments_bytes"]
  assert r["step_time_bound_s"] == pytest.approx(r["flops_per_step"] / (1e12 * 8))


def test_a_step_the_compiler_refuses_does_not_fit(measured, monkeypatch):
  """The TPU compiler refuses a step whose temporaries exceed the chip's memory (as it
  does for the reference attention at long lengths): the verdict says so in one line
  with the compiler's figure; other compile errors propagate."""
  job, _ = measured
  refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
             "for HLO temporaries (34.20G) exceeds available HBM (15.75G).\ndetails")

  def refuse(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(refusal)

  monkeypatch.setattr(dry_run, "compile_train_step", refuse)
  measure = lambda: dry_run.measure(job, batch_size=BATCH, task_feature_lengths=LENGTHS,
                                    step_options={})
  r = dry_run.judge(measure(), None)
  assert r["fits"] is False and r["total_bytes"] is None and r["params_bytes"] > 0
  r["replicated"] = []
  lines = dry_run.format_report(r).splitlines()
  assert lines[0].startswith("dry run: train step refused in ")
  assert lines[-1] == (
      "verdict: does not fit: the cpu compiler refused the step (" + refusal.splitlines()[0]
      + "); shard more (create_mesh.fsdp / tensor), raise train.num_microbatches or use "
      "more devices.")
  refusal = "INTERNAL: something else"
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    measure()


def test_verdict_flips_at_the_needed_memory(measured):
  job, r = measured
  need = r["total_bytes"]
  assert dry_run.judge(r, need)["fits"] is True
  assert dry_run.verdict(dry_run.judge(r, need)).startswith("fits:")
  assert dry_run.judge(r, need - 1)["fits"] is False
  assert dry_run.verdict(dry_run.judge(r, need - 1)).startswith("does not fit:")
  assert dry_run.judge(r, None)["fits"] is None  # a CPU reports no memory
  assert dry_run.device_memory(job, dry_run.DryRun()) is None
  assert dry_run.device_memory(job, dry_run.DryRun(device_memory_gib=2)) == 2 * 2**30
  with pytest.raises(ValueError, match="--device_memory_gib=0 must be a positive number"):
    dry_run.DryRun(device_memory_gib=0)


def test_a_tpu_topology_without_tpu_support_is_one_line():
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed: the topology exists here")
  with pytest.raises(ValueError, match=r"--dry_run_topology='v5e:4x4' gives no devices here "
                     r"\(.*\); compiling for a TPU topology needs .*pip install 'jax\[tpu\]'"):
    topologies.topology_devices("v5e:4x4")


def test_max_replicated_param_bytes_stops_the_job_before_any_work(tmp_path, capsys):
  # tensor=2 shards TINY's kernels; its (32,) norm scales have no axis left (fsdp=1).
  args = dict(model_dir=str(tmp_path / "run"), train_steps=2, model_config=TINY, batch_size=8,
              mixture_or_task_name="ul2x_span_corruption", task_feature_lengths=LENGTHS,
              mesh=partitioning.create_mesh(data=4, tensor=2))
  # 1e2 as gin passes --gin.train.max_replicated_param_bytes=1e2: a float, read as 100.
  with pytest.raises(ValueError, match=r"parameter \S+/scale \(32,\) \(128 bytes\) stays "
                     r"replicated on every device .* over train.max_replicated_param_bytes=100;"):
    loop.train(**args, max_replicated_param_bytes=1e2)
  assert "replicated parameters: " in capsys.readouterr().out
  with pytest.raises(ValueError, match=r"max_replicated_param_bytes=-1 is not a number of bytes"):
    loop.train(**args, max_replicated_param_bytes=-1)
  with pytest.raises(ValueError, match=r"max_replicated_param_bytes=1.5 is not a number of bytes; "
                     r"pass a whole number of bytes"):
    loop.train(**args, max_replicated_param_bytes=1.5)
  assert not (tmp_path / "run").exists()


def _cli_dry_run(model_dir, *flags, **env):
  env = cpu_env(8, **env)
  args = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=8",
          "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
          "--gin.TransformerConfig.num_encoder_layers=1",
          "--gin.TransformerConfig.num_decoder_layers=1",
          "--gin.create_mesh.data=4", "--gin.create_mesh.tensor=2", "--dry_run", *flags]
  return subprocess.run([sys.executable, "-m", "ul2x.train", *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_cli_dry_run_exits_1_when_it_does_not_fit_and_writes_nothing(tmp_path):
  model_dir = tmp_path / "run"
  result = _cli_dry_run(model_dir, "--device_memory_gib=0.001")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "mesh data=4 fsdp=1 expert=1 sequence=1 tensor=2" in result.stdout
  verdict = result.stdout.strip().splitlines()[-1]
  assert verdict.startswith("verdict: does not fit: needs ") and "1.0 MiB" in verdict
  # Pure tensor parallelism leaves the norm scales (embed) replicated: named at start-up.
  assert "replicated parameters: " in result.stdout
  assert "no rule maps its axes ('embed',)" in result.stdout
  assert not model_dir.exists()


CUDA_PLUGIN = compilers.compiler_folder("cuda_plugin")
CUDA_PLUGIN_MISSING = compilers.missing("cuda_plugin")


@pytest.mark.skipif(CUDA_PLUGIN_MISSING is not None,
                    reason=f"JAX's CUDA plugin: {CUDA_PLUGIN_MISSING}")
def test_cli_dry_run_for_gpus_this_host_lacks(tmp_path):
  """--dry_run_topology=h100:8 compiles with XLA's GPU compiler for 8 H100s described by
  their target config, and judges against what JAX lets a process use of an H100 (75% of
  its 79.1 GiB)."""
  result = _cli_dry_run(tmp_path / "run", "--dry_run_topology=h100:8",
                        PYTHONPATH=str(CUDA_PLUGIN))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "for 8 x NVIDIA H100 80GB HBM3, mesh data=4" in result.stdout
  assert "at 100% MFU (989 TFLOP/s per device)" in result.stdout
  verdict = result.stdout.strip().splitlines()[-1]
  assert verdict.startswith("verdict: fits: needs ") and verdict.endswith("of 59.4 GiB.")
  assert not (tmp_path / "run").exists()


def test_gpu_topology_names_are_checked_in_one_line():
  with pytest.raises(ValueError, match=r"--dry_run_topology='h100:eight': give a GPU count, "
                     r"e.g. h100:8, or hosts x GPUs per host, e.g. h100:4x8\."):
    topologies.topology_devices("h100:eight")
  with pytest.raises(ValueError, match=r"--dry_run_topology='b200:8': unknown device kind "
                     r"'b200'; give a GPU \(a100, h100, h200\), e.g. h100:8, or a TPU"):
    topologies.topology_devices("b200:8")
  if importlib.util.find_spec("jax_plugins") is None:  # no CUDA plugin in this process
    with pytest.raises(ValueError, match=r"--dry_run_topology='h200:8' gives no devices here "
                       r"\(.*\); compiling for a GPU needs JAX's CUDA plugin, started "
                       r"without a GPU: `make cuda_plugin`, then PYTHONPATH=.cuda_plugin "
                       r"JAX_PLATFORMS=cpu"):
      topologies.topology_devices("h200:8")


def test_compile_only_gpus_get_the_memory_jax_would_let_a_process_use(monkeypatch):
  h200 = topologies.GPU_TARGETS["h200"]
  assert topologies.device_memory_bytes(h200.kind) == int(0.75 * h200.memory_bytes)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert topologies.device_memory_bytes(h200.kind) == int(0.9 * h200.memory_bytes)
  assert topologies.device_memory_bytes("cpu") is None


@dataclasses.dataclass(frozen=True)
class FakeTpuChip:
  """What jax.make_mesh reads of a TPU device: enough to lay out a mesh without libtpu."""
  id: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v5"  # a v5p chip, as libtpu names it
  slice_index: int = 0


V5P_4X4X4 = topologies.TopologyDevices(
    FakeTpuChip(i, (x, y, z)) for i, (z, y, x) in enumerate(itertools.product(range(4), repeat=3)))
SIZES_THAT_FIT = "sizes that fit: data=4 fsdp=16, data=1 fsdp=64, data=16 fsdp=4, data=64 fsdp=1;"


def test_a_mesh_the_tpu_slice_cannot_lay_out_names_sizes_that_fit(tmp_path, monkeypatch):
  """jax.make_mesh gives each mesh axis whole physical dimensions of a v5p slice: fsdp=32
  is no product of 4, 4 and 4. The job stops at start-up with one line naming the axis
  and the sizes that do fit, each of which builds."""
  monkeypatch.setattr(topologies, "topology_devices", lambda name: V5P_4X4X4)
  result = run_job(
      "train", "--gin_file=gin_configs/models/tiny.gin",
      "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      "--gin.TRAIN_STEPS=10", "--gin.MIXTURE_OR_TASK_NAME='ul2x_span_corruption'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
      "--gin.create_mesh.data=2", "--gin.create_mesh.fsdp=32", "--dry_run",
      "--dry_run_topology=v5p:4x4x4")
  one_line_error(result, "create_mesh: axis 'fsdp' of size 32 cannot be laid onto the TPU's "
                 "physical mesh 4x4x4 (jax.make_mesh gives each mesh axis whole physical "
                 "dimensions", SIZES_THAT_FIT,
                 "set e.g. --gin.create_mesh.data=4 --gin.create_mesh.fsdp=16.")
  assert not (tmp_path / "run").exists()
  for data in (4, 1, 16, 64):
    mesh = partitioning.create_mesh(data=data, fsdp=64 // data, devices=V5P_4X4X4)
    assert mesh.shape["fsdp"] == 64 // data
  with pytest.raises(partitioning.MeshError, match=r"axis 'tensor' of size 8 .* sizes that "
                     r"fit: data=4 fsdp=4 tensor=4, "):
    partitioning.create_mesh(data=2, fsdp=4, tensor=8, devices=V5P_4X4X4)
  # Where no sizes fit (jax.make_mesh takes one slice only), JAX's own error stands.
  two_slices = [dataclasses.replace(d, slice_index=d.coords[0] // 2) for d in V5P_4X4X4]
  with pytest.raises(ValueError, match="does not support multi-slice topologies"):
    partitioning.create_mesh(data=4, fsdp=16, devices=two_slices)


LIBTPU_MISSING = compilers.missing("libtpu")


@pytest.mark.skipif(LIBTPU_MISSING is not None, reason=f"the TPU compiler: {LIBTPU_MISSING}")
def test_cli_dry_run_for_a_tpu_slice_names_mesh_sizes_that_fit(tmp_path):
  """The real compile-only v5p 4x4x4 devices (libtpu), as the user's command sees them."""
  result = _cli_dry_run(tmp_path / "run", "--gin.create_mesh.data=2",
                        "--gin.create_mesh.fsdp=32", "--gin.create_mesh.tensor=1",
                        "--dry_run_topology=v5p:4x4x4",
                        PYTHONPATH=str(compilers.compiler_folder("libtpu")))
  one_line_error(result, "create_mesh: axis 'fsdp' of size 32 cannot be laid onto the TPU's "
                 "physical mesh 4x4x4 ", SIZES_THAT_FIT)
  assert not (tmp_path / "run").exists()
