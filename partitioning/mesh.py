"""The device mesh ('data','fsdp','expert','sequence','tensor') and multi-host start-up."""

import math
import os
import sys
import threading

import gin
import jax
from absl import logging
from jax._src import distributed
from jax.sharding import AxisType, Mesh

from ul2x.partitioning.peers import jax_heartbeat_timeout, watch_peers
from ul2x.partitioning.rules import MESH_AXES


class MeshError(ValueError):
  """The requested mesh does not fit the devices."""


def mesh_shape_for(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Resolves axis sizes (at most one -1, filling the rest) against the device count."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}.")
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise MeshError(f"mesh sizes {sizes} are invalid: use positive sizes and at most one -1.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise MeshError(
          f"mesh {sizes} needs a multiple of {fixed} devices but there are {num_devices}; "
          "change the mesh sizes.")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(
        f"mesh {sizes} has {math.prod(sizes.values())} devices but there are {num_devices}; "
        "make the product of the sizes equal the device count or use -1 for one axis.")
  return sizes


def mesh_platform(mesh) -> str:
  """The platform a computation over `mesh` compiles for: its devices' (compile-only
  TPU or GPU devices too), else, without a mesh, the default backend's."""
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


@gin.configurable
def create_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, sequence: int = 1,
                tensor: int = 1, devices=None) -> Mesh:
  """Builds the mesh; -1 (at most one axis) fills what the other axes leave."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape_for(dict(data=data, fsdp=fsdp, expert=expert, sequence=sequence,
                              tensor=tensor), len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _exit_after(seconds: float, message: str) -> threading.Timer:
  """Prints `error: message` and exits with status 2 after `seconds` unless cancelled.
  JAX's own timeout aborts the process with a C++ stack trace and no word of which
  process waited for what; this fires first."""
  def fire():
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)

  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  timer.start()
  return timer


def initialize_distributed(coordinator_address: str | None, process_count: int,
                           process_index: int, timeout_s: int = 300,
                           peer_timeout_s: int = 60) -> None:
  """Multi-host start-up (T5X flags); a no-op for a single process. If the processes
  have not all joined within `timeout_s`, exits with one line naming this process and
  the coordinator; later, a process silent for `peer_timeout_s` is named in one line
  (partitioning/peers.py)."""
  if process_count <= 1:
    return
  if not coordinator_address:
    raise MeshError(
        f"--process_count={process_count} needs --coordinator_address=HOST:PORT.")
  if not 0 <= process_index < process_count:
    raise MeshError(
        f"--process_index={process_index} must be in [0, {process_count}).")
  for flag, value in (("distributed_timeout", timeout_s), ("peer_timeout", peer_timeout_s)):
    if value < 1:
      raise MeshError(f"--{flag}={value} must be at least 1 second.")
  role = "is the coordinator" if process_index == 0 else "connects to the coordinator"
  timer = _exit_after(timeout_s, (
      f"process {process_index} of {process_count} ({role} at {coordinator_address}) saw "
      f"not all {process_count} processes join within {timeout_s} s; start every process "
      "with the same --coordinator_address and --process_count, check that process 0 runs "
      "and its address is reachable, or raise --distributed_timeout."))
  try:
    jax.distributed.initialize(coordinator_address, process_count, process_index,
                               initialization_timeout=timeout_s + 60,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout(peer_timeout_s))
  finally:
    timer.cancel()
  watch_peers(distributed.global_state.client, process_index, process_count,
              coordinator_address, peer_timeout_s)
  logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
