"""Accelerator devices: their data-sheet facts (peak FLOP/s, memory), and compile-only
devices of accelerators this machine need not have, for the dry run
(`--dry_run_topology`), the benches' compile-only modes and the compile tests: TPU
topologies (JAX's TPU support, libtpu: `make libtpu`) and NVIDIA GPUs described by a
target config (JAX's CUDA plugin: `make cuda_plugin`). Their compiler is the real one;
nothing runs."""

import contextlib
import dataclasses
import os

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA's GPU compiler needs to know of a GPU it does not see (data-sheet facts)."""

  kind: str  # the device_kind JAX reports
  compute_capability: tuple[int, int]
  cores: int  # streaming multiprocessors
  memory_bytes: int
  bandwidth: float  # bytes/s
  l2_bytes: int
  clock_ghz: float
  shared_per_core: int
  shared_per_block_optin: int
  fp32_per_core: int = 128  # FP32 lanes per SM


GPU_TARGETS = {  # memory as the device reports it (XLA's GPU specs)
    "a100": GpuTarget("NVIDIA A100-SXM4-80GB", (8, 0), 108, 85100068864, 2.039e12,
                      40 * 2**20, 1.41, 167936, 166912, fp32_per_core=64),
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", (9, 0), 132, 84978434048, 3.35e12,
                      50 * 2**20, 1.98, 233472, 232448),
    "h200": GpuTarget("NVIDIA H200", (9, 0), 132, 151397597184, 4.8e12, 50 * 2**20, 1.98,
                      233472, 232448),
}
TPU_MEMORY = {"TPU v4": 32 * GIB, "TPU v5 lite": int(15.75 * GIB), "TPU v5": 95 * GIB,
              "TPU v6 lite": 32 * GIB}  # HBM per chip available to XLA, by device_kind
GPU_MEMORY_FRACTION = 0.75  # of a GPU's memory a JAX process may use by default

# Dense bf16 peak FLOP/s per device from vendor data sheets; first substring match wins.
# JAX names a v5e "TPU v5 lite", a v5p "TPU v5" and a v6e "TPU v6 lite".
_PEAK_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12,
}


def vendor_peak_flops(device_kind: str) -> float | None:
  """The data-sheet dense bf16 peak FLOP/s of a device kind, or None if unknown."""
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None


def gpu_target_config(t: GpuTarget) -> str:
  """`t` as XLA's GpuTargetConfigProto in text format."""
  major, minor = t.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {t.shared_per_core} threads_per_core_limit: 2048
  core_count: {t.cores} fpus_per_core: {t.fp32_per_core} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {int(t.bandwidth)}
  l2_cache_size: {t.l2_bytes} clock_rate_ghz: {t.clock_ghz}
  device_memory_size: {t.memory_bytes}
  shared_memory_per_block_optin: {t.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{t.kind}"
"""


class TopologyDevices(tuple):
  """Devices that gin can hold as a bound value (`create_mesh.devices`): gin deep-copies
  bound values on every call, and a JAX device cannot be copied."""

  def __deepcopy__(self, memo):
    return self


def _gpu_shape(name: str, shape: str) -> tuple[int, int]:
  """'8' -> (1 host, 8 GPUs); '4x8' -> (4 hosts, 8 GPUs each)."""
  parts = shape.split("x")
  if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--dry_run_topology={name!r}: give a GPU count, e.g. "
                     f"{name.split(':')[0]}:8, or hosts x GPUs per host, e.g. "
                     f"{name.split(':')[0]}:4x8.")
  return (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def topology_devices(name: str) -> TopologyDevices:
  """Compile-only devices of `name`: a TPU topology such as 'v5e:4x4' or 'v5p:2x2x2', or
  GPUs such as 'h100:8' (one host) or 'h100:4x8' (hosts x GPUs), of the kinds in
  GPU_TARGETS. A TPU needs JAX's TPU support (libtpu), a GPU JAX's CUDA plugin; either
  compiles on any machine (`make libtpu` / `make cuda_plugin`, then PYTHONPATH=.libtpu
  or .cuda_plugin)."""
  from jax.experimental import topologies
  kind, _, shape = name.partition(":")
  gpu = GPU_TARGETS.get(kind.lower())
  if gpu is None and not kind.lower().startswith("v"):
    raise ValueError(f"--dry_run_topology={name!r}: unknown device kind {kind!r}; give a GPU "
                     f"({', '.join(GPU_TARGETS)}), e.g. h100:8, or a TPU topology, e.g. "
                     "v5e:4x4.")
  hosts, per_host = _gpu_shape(name, shape) if gpu else (None, None)
  if gpu is None and os.environ.get("JAX_PLATFORMS") == "cpu":
    # This process opens no TPU, so it need not hold libtpu's one-process lock
    # (/tmp/libtpu_lockfile): several compile-only jobs can run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    if gpu is None:
      return TopologyDevices(topologies.get_topology_desc(name, platform="tpu").devices)
    return TopologyDevices(topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{per_host}",
        target_config=gpu_target_config(gpu)).devices)
  except (RuntimeError, NotImplementedError, ValueError) as e:
    cause = " ".join(str(e).split())[:200]
    support = ("a GPU needs JAX's CUDA plugin, started without a GPU: `make cuda_plugin`, "
               "then PYTHONPATH=.cuda_plugin JAX_PLATFORMS=cpu" if gpu else
               "a TPU topology needs JAX's TPU support (`make libtpu` and "
               "PYTHONPATH=.libtpu, or pip install 'jax[tpu]') and a name such as 'v5e:4x4'")
    raise ValueError(
        f"--dry_run_topology={name!r} gives no devices here ({cause}); compiling for "
        f"{support}; without it, simulate the device count with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N.") from None


def lowering_platform(device) -> str:
  """The platform name `lower(lowering_platforms=...)` takes for `device` ('cuda' for a
  GPU, whose devices say 'gpu')."""
  return "cuda" if device.platform == "gpu" else device.platform


@contextlib.contextmanager
def gpu_target(device_kind: str):
  """Inside, Pallas lowers Triton kernels for a GPU of `device_kind` (e.g. 'NVIDIA H200')
  though this host has none: jax >= 0.12 reads the GPU to lower for from the context's
  abstract mesh, not from the arrays' devices, and only falls back to the default device
  (here a CPU). An empty abstract mesh carries the device; older jax needs nothing."""
  import jax
  if not hasattr(jax.sharding, "AbstractDevice"):
    yield
    return
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    yield


def device_memory_bytes(device_kind: str) -> int | None:
  """What a JAX process may use of a compile-only device of this kind (which reports
  nothing), or None: a TPU's HBM; a GPU's memory times XLA_PYTHON_CLIENT_MEM_FRACTION
  (JAX's default 0.75), as the GPU's `bytes_limit` would be."""
  for target in GPU_TARGETS.values():
    if target.kind == device_kind:
      fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
      return int(target.memory_bytes * fraction)
  return TPU_MEMORY.get(device_kind)
