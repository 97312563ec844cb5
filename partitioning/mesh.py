"""The device mesh ('data','fsdp','expert','sequence','tensor') and multi-host start-up."""

import math
import os
import re
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
  try:
    return _lay_out(sizes, devices)
  except (NotImplementedError, ValueError) as error:
    fits = _sizes_that_fit(sizes, devices)
    if not fits:  # no axis size is to blame (e.g. devices of several slices)
      raise
    raise _unlaid_mesh_error(sizes, devices, fits, str(error)) from error


def _lay_out(sizes: dict[str, int], devices) -> Mesh:
  """`jax.make_mesh` over `devices`: on a TPU it gives each axis whole physical
  dimensions (NotImplementedError where an axis's size is no product of some of them)."""
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _factorizations(total: int, count: int):
  """Every tuple of `count` positive ints whose product is `total`."""
  if count == 1:
    yield (total,)
    return
  for first in range(1, total + 1):
    if total % first == 0:
      for rest in _factorizations(total // first, count - 1):
        yield (first, *rest)


def _sizes_that_fit(sizes: dict[str, int], devices, limit: int = 4) -> list[dict[str, int]]:
  """Up to `limit` other sizes of the axes over 1 in `sizes` (same product, the other
  axes kept) that `jax.make_mesh` lays onto `devices`, the closest to `sizes` first."""
  varied = [a for a in MESH_AXES if sizes[a] > 1]
  total = math.prod(sizes[a] for a in varied)

  def distance(candidate):  # factors of 2 moved, then axes dropped to 1
    return (sum(abs(math.log2(n / sizes[a])) for a, n in zip(varied, candidate)),
            sum(n == 1 for n in candidate))

  found = []
  for candidate in sorted(_factorizations(total, len(varied)), key=distance):
    other = {**sizes, **dict(zip(varied, candidate))}
    if other == sizes:
      continue
    try:
      _lay_out(other, devices)
    except (NotImplementedError, ValueError):
      continue
    found.append(other)
    if len(found) == limit:
      break
  return found


def _physical_shape(devices) -> str:
  """'4x4x4' for TPU chips whose coordinates fill a 4x4x4 box (with the cores per chip
  last where a chip shows several); else the device count."""
  coords = [getattr(d, "coords", None) for d in devices]
  if any(c is None for c in coords):
    return f"of {len(devices)} devices"
  dims = [max(c[i] for c in coords) - min(c[i] for c in coords) + 1
          for i in range(len(coords[0]))]
  cores = len({getattr(d, "core_on_chip", 0) for d in devices})
  return "x".join(str(n) for n in dims + ([cores] if cores > 1 else []))


def _unlaid_mesh_error(sizes: dict[str, int], devices, fits: list[dict[str, int]],
                       cause: str) -> MeshError:
  """One line for a mesh `jax.make_mesh` cannot lay onto `devices` (its message
  `cause`): the axis, the physical mesh and the sizes that fit."""
  show = lambda s: " ".join(f"{a}={s[a]}" for a in MESH_AXES if s[a] > 1 or sizes[a] > 1)
  axis = re.search(r"logical_axis_index (\d+) of size (\d+)", cause)
  what = (f"axis '{MESH_AXES[int(axis[1])]}' of size {axis[2]}" if axis
          else f"mesh {show(sizes)}")
  fix = " ".join(f"--gin.create_mesh.{a}={n}" for a, n in fits[0].items() if n != sizes[a])
  return MeshError(
      f"create_mesh: {what} cannot be laid onto the {devices[0].platform.upper()}'s "
      f"physical mesh {_physical_shape(devices)} (jax.make_mesh gives each mesh axis whole "
      "physical dimensions, so each size must be a product of some of them); sizes that "
      f"fit: {', '.join(show(s) for s in fits)}; set e.g. {fix}.")


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
