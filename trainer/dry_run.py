"""The train job's dry run: its state and train step compiled (never run) for the
configured mesh, without data or training, and what they need per device."""

import dataclasses
import time

import jax

from ul2x.model.flops import training_flops_per_example
from ul2x.partitioning import report
from ul2x.partitioning.topologies import device_memory_bytes, vendor_peak_flops
from ul2x.tasks import pipeline
from ul2x.trainer.console import say
from ul2x.trainer.setup import Setup

GIB = 2**30
LISTED_REPLICATED = 10  # the report names this many of the largest replicated parameters


@dataclasses.dataclass(frozen=True)
class DryRun:
  """What `--dry_run` was asked for.

  device_memory_gib: memory per device to fit in; None: the device's own where it
  reports it (`memory_stats()['bytes_limit']`, GPU and TPU), for compile-only devices
  their kind's (partitioning/topologies.py), else unknown.
  peak_tflops: peak per device for the time bound; None: the data-sheet figure of the
  mesh's device kind (`topologies.vendor_peak_flops`), else unknown.
  """
  device_memory_gib: float | None = None
  peak_tflops: float | None = None

  def __post_init__(self):
    for flag, value in (("--device_memory_gib", self.device_memory_gib),
                        ("--peak_tflops", self.peak_tflops)):
      if value is not None and not value > 0:
        raise ValueError(f"{flag}={value} must be a positive number, e.g. {flag}=16.")


def compile_train_step(job: Setup, batch_size: int, lengths: dict[str, int], **step_options):
  """The train step lowered and compiled for `job.mesh` with abstract inputs."""
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       job.abstract_state(), job.shardings)
  return job.train_step(**step_options).lower(
      state, job.abstract_batch(batch_size, lengths)).compile()


def device_memory(job: Setup, options: DryRun) -> int | None:
  """Bytes per device to fit in: `options.device_memory_gib`, else what the mesh's
  (local) device reports, else None (unknown)."""
  if options.device_memory_gib is not None:
    return int(options.device_memory_gib * GIB)
  local = [d for d in job.mesh.devices.flat if d in jax.local_devices()]
  if not local:  # a compile-only topology: not this machine's; its kind's data sheet
    return device_memory_bytes(job.mesh.devices.flat[0].device_kind)
  device = local[0]
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def measure(job: Setup, *, batch_size: int, task_feature_lengths: dict, step_options: dict,
            peak_tflops: float | None = None) -> dict:
  """Compiles the train step (never runs it) and returns bytes per device (params,
  opt_state; the step's arguments, outputs, donated and temporary buffers; their
  total), flops_per_step, and step_time_bound_s (at 100% MFU; None without a peak)."""
  lengths = pipeline.feature_lengths_for(job.cfg.architecture, task_feature_lengths)
  start = time.perf_counter()
  try:
    memory = compile_train_step(job, batch_size, lengths, **step_options).memory_analysis()
    out_of_memory = None
  except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses what cannot fit
    if not (str(error).startswith("RESOURCE_EXHAUSTED") and "hbm" in str(error).lower()):
      raise
    memory, out_of_memory = None, str(error).splitlines()[0]
  compile_s = time.perf_counter() - start
  state = job.abstract_state()
  bytes_of = lambda name: None if memory is None else getattr(memory, f"{name}_size_in_bytes")
  result = {
      "devices": job.mesh.size,
      "device_kind": job.mesh.devices.flat[0].device_kind,
      "mesh": dict(job.mesh.shape),
      "batch": {"batch_size": batch_size, **task_feature_lengths},
      "compile_seconds": compile_s,
      "params_bytes": report.bytes_per_device(state["params"], job.shardings["params"]),
      "opt_state_bytes": report.bytes_per_device(state["opt_state"], job.shardings["opt_state"]),
      "arguments_bytes": bytes_of("argument"),
      "outputs_bytes": bytes_of("output"),
      "aliased_bytes": bytes_of("alias"),
      "temp_bytes": bytes_of("temp"),
      "total_bytes": None if memory is None else (bytes_of("argument") + bytes_of("output")
                                                  - bytes_of("alias") + bytes_of("temp")),
      "compiler_out_of_memory": out_of_memory,
      "flops_per_step": batch_size * training_flops_per_example(job.cfg, lengths),
  }
  peak = (peak_tflops * 1e12 if peak_tflops is not None
          else vendor_peak_flops(result["device_kind"]))
  result["peak_flops_per_device"] = peak
  result["step_time_bound_s"] = peak and result["flops_per_step"] / (peak * job.mesh.size)
  return result


def judge(result: dict, device_memory_bytes: int | None) -> dict:
  """`result` with device_memory_bytes and fits: True, False, or None (unknown memory);
  False when the compiler itself ran out of device memory."""
  if result["compiler_out_of_memory"]:
    fits = False
  else:
    fits = None if device_memory_bytes is None else result["total_bytes"] <= device_memory_bytes
  return {**result, "device_memory_bytes": device_memory_bytes, "fits": fits}


def dry_run(job: Setup, options: DryRun, *, batch_size: int, task_feature_lengths: dict,
            step_options: dict, replicated: list) -> dict:
  """The dry run of a configured job: `measure`, `judge` against the device memory, the
  replicated parameters; prints the report (process 0) and returns it."""
  result = measure(job, batch_size=batch_size, task_feature_lengths=task_feature_lengths,
                   step_options=step_options, peak_tflops=options.peak_tflops)
  result = judge(result, device_memory(job, options))
  result["replicated"] = [dataclasses.asdict(p) for p in replicated]
  say(format_report(result))
  return result


def verdict(r: dict) -> str:
  """The report's last line, e.g. 'fits: needs 10.7 MiB per device of 16.0 GiB.'"""
  advice = ("shard more (create_mesh.fsdp / tensor), raise train.num_microbatches or use "
            "more devices.")
  if r["compiler_out_of_memory"]:
    return (f"does not fit: the {r['device_kind']} compiler refused the step "
            f"({r['compiler_out_of_memory']}); {advice}")
  need = report.human_bytes(r["total_bytes"])
  if r["fits"] is None:
    return (f"fit unknown: needs {need} per device and this device does not report its "
            "memory; pass --device_memory_gib=N to check.")
  have = report.human_bytes(r["device_memory_bytes"])
  if r["fits"]:
    return f"fits: needs {need} per device of {have}."
  return f"does not fit: needs {need} per device, more than {have}; {advice}"


def _duration(seconds: float) -> str:
  return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else (
      f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s")


def format_report(r: dict) -> str:
  """The console report of `dry_run`: a few lines, the verdict last."""
  b = report.human_bytes
  mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
  lines = [
      f"dry run: train step {'refused' if r['compiler_out_of_memory'] else 'compiled'} in "
      f"{r['compile_seconds']:.1f} s for {r['devices']} x "
      f"{r['device_kind']}, mesh {mesh}; batch {r['batch']}",
      f"  parameters       {b(r['params_bytes'])} per device",
      f"  optimizer state  {b(r['opt_state_bytes'])} per device",
  ]
  if not r["compiler_out_of_memory"]:
    lines += [
        f"  step arguments   {b(r['arguments_bytes'])} (state + batch), outputs "
        f"{b(r['outputs_bytes'])}, {b(r['aliased_bytes'])} of them in donated buffers",
        f"  temporaries      {b(r['temp_bytes'])}",
        f"  total            {b(r['total_bytes'])} per device "
        "(arguments + outputs - donated + temporaries)"]
  flops = f"  FLOPs per step   {r['flops_per_step']:.3g}"
  if r["step_time_bound_s"]:
    flops += (f"; at 100% MFU ({r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device) "
              f"a step takes at least {_duration(r['step_time_bound_s'])}")
  else:
    flops += (f"; no peak FLOP/s known for {r['device_kind']!r}: pass --peak_tflops=N for "
              "the time bound")
  lines.append(flops)
  for p in r["replicated"][:LISTED_REPLICATED]:
    lines.append(f"  replicated       {p['path']} {p['shape']} {b(p['nbytes'])}: {p['reason']}")
  if len(r["replicated"]) > LISTED_REPLICATED:
    lines.append(f"  replicated       ... and {len(r['replicated']) - LISTED_REPLICATED} "
                 "smaller ones")
  lines.append(f"verdict: {verdict(r)}")
  return "\n".join(lines)
