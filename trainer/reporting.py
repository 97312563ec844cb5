"""What the training loop reports: TensorBoard events, console progress lines, MFU."""

import collections
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from ul2x.partitioning.topologies import vendor_peak_flops

def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Per-device float32 FLOP/s of n x n matmuls run on all local devices at once:
  the 'peak' used for MFU where no vendor figure is known (simulated CPU devices
  share the host's cores, so they are measured together)."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(devices, ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.full((len(devices), n, n), 1.0 / n, jnp.float32), sharding)
  matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    a = matmul(a)
  a.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops_per_device() -> float:
  """Vendor peak for known accelerators, else a measured matmul rate."""
  return vendor_peak_flops(jax.devices()[0].device_kind) or measured_matmul_flops()


class MetricsWriter:
  """TensorBoard scalars, and histograms of vector metrics (e.g. MoE tokens per expert),
  under `directory` (only process 0 writes). TensorFlow is imported here, not with the
  module, so that the MFU helpers above work where TensorFlow is not installed."""

  def __init__(self, directory: str):
    import tensorflow as tf
    self.summary = tf.summary
    self.writer = (tf.summary.create_file_writer(directory)
                   if jax.process_index() == 0 else None)

  def write(self, step: int, scalars: dict):
    if self.writer is None:
      return
    with self.writer.as_default():
      for name, value in scalars.items():
        if np.ndim(value):
          self.summary.histogram(name, np.asarray(value, np.float32), step=step)
        else:
          self.summary.scalar(name, float(value), step=step)
    self.writer.flush()


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Throughput since the last report and the console line. Time spent `paused`
  (compilation, checkpoint saves) is no step time: the line shows it on its own, and the
  ETA is the median step time of the last `RECENT` reports times the steps left."""

  RECENT = 10

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_step: float,
               peak_flops: float, clock=time.perf_counter):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops * jax.device_count()
    self.clock = clock
    self.step_times = collections.deque(maxlen=self.RECENT)
    self.apart = {}  # what -> seconds paused since the last report
    self.mark(None)

  def mark(self, step):
    """Starts the next interval at `step` (work since the last report is not step time)."""
    self.last_step, self.last_time, self.paused_s = step, self.clock(), 0.0

  @contextlib.contextmanager
  def paused(self, what: str, pause: bool = True):
    """Time inside (e.g. 'compile', 'save') is left out of the step time and shown apart."""
    start = self.clock()
    try:
      yield
    finally:
      if pause:
        seconds = self.clock() - start
        self.paused_s += seconds
        self.apart[what] = self.apart.get(what, 0.0) + seconds

  def report(self, step: int, metrics: dict) -> dict:
    """Adds speed metrics to `metrics`, prints the line, returns the scalars (vector
    metrics are left out)."""
    steps = step - self.last_step
    step_time = max(self.clock() - self.last_time - self.paused_s, 1e-6) / max(steps, 1)
    self.step_times.append(step_time)
    eta = float(np.median(self.step_times)) * (self.total_steps - step)
    apart = "".join(f"  {what} {seconds:.1f} s" for what, seconds in self.apart.items())
    self.apart = {}
    self.mark(step)
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    scalars.update(step_time=step_time, tokens_per_second=self.tokens_per_step / step_time,
                   mfu=self.flops_per_step / step_time / self.peak_flops)
    if jax.process_index() == 0:
      print(f"step {step}/{self.total_steps}  loss {scalars['loss']:.4f}  "
            f"acc {scalars['accuracy']:.3f}  lr {scalars['learning_rate']:.2e}  "
            f"gnorm {scalars['grad_norm']:.3f}  tok/s {scalars['tokens_per_second']:,.0f}  "
            f"step {step_time * 1e3:.0f} ms  MFU {100 * scalars['mfu']:.1f}%  "
            f"ETA {_clock(eta)}{apart}" + _moe_summary(scalars)
            + (f"  skipped {scalars['skipped_steps']:.0f}" if scalars.get("skipped_steps")
               else ""),
            flush=True)
    return scalars


def _moe_summary(scalars: dict) -> str:
  """MoE models: router losses (summed over MoE layers) and unrouted tokens."""
  if "moe/aux_loss" not in scalars:
    return ""
  return (f"  moe aux {scalars['moe/aux_loss']:.3f}  rz {scalars['moe/router_z_loss']:.3f}  "
          f"unrouted {100 * scalars['moe/unrouted_fraction']:.1f}%")
