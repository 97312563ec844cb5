"""Flash attention: TFLOP/s of the Pallas kernel (kernels/flash_attention.py) against
`jax.nn.dot_product_attention` ('xla', and 'cudnn' where available), forward and
forward + backward, causal, bfloat16, head_dim 64 and 128, lengths 1k-32k; and with
the T5 relative bias (computed inside the kernel) against the same implementations
given the dense [batch, heads, L, L] bias and against the model's reference
(`model/attention.py::dot_product_attention`), each where its dense tensors fit in
memory. Prints JSON.

FLOPs are the model's: 4 * batch * heads * L^2 * head_dim for the forward (two
matmuls), 3x that for forward + backward (no credit for recomputation), halved when
causal. Batch x length is held at 32k tokens, heads x head_dim at 2048.

On a GPU:    .venv/bin/python bench/attention.py
On CPU:      JAX_PLATFORMS=cpu .venv/bin/python bench/attention.py --smoke
(--smoke: the kernel in interpret mode at tiny sizes, checked against the reference,
and timed; seconds, not a measurement of anything but correctness.)
"""

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from ul2x.kernels import flash_attention as flash
from ul2x.model.attention import dot_product_attention
from ul2x.model.position import T5BucketBias, relative_position_bucket

BIAS = T5BucketBias(num_buckets=32, max_distance=128, bidirectional=False)
BUCKETS = functools.partial(relative_position_bucket, bidirectional=False, num_buckets=32,
                            max_distance=128)


def _inputs(batch, length, heads, head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (batch, length, heads, head_dim)
  q, k, v, ct = (jax.random.normal(key, shape, dtype) for key in keys[:4])
  table = jax.random.normal(keys[4], (heads, BIAS.num_buckets), jnp.float32) * 0.5
  seg = jnp.ones((batch, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return q, k, v, ct, table, seg, pos


def _attention(impl: str, causal: bool, bias: bool, scale: float, interpret=None):
  """f(q, k, v, table, seg, pos) -> out for one implementation."""
  def attend(q, k, v, table, seg, pos):
    tokens = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                  causal=causal, scale=scale)
    if impl == "flash":
      return flash.flash_attention(q, k, v, bias_table=table if bias else None,
                                   bucket_fn=BUCKETS if bias else None, interpret=interpret,
                                   **tokens)
    if impl == "reference":
      return dot_product_attention(q, k, v, bias=BIAS(table, pos, pos) if bias else None,
                                   **tokens)
    dense = BIAS(table, pos, pos).astype(q.dtype) if bias else None
    return jax.nn.dot_product_attention(q, k, v, bias=dense, scale=scale, is_causal=causal,
                                        implementation=impl)
  return attend


def _programs(attend):
  fwd = jax.jit(attend)

  def loss(q, k, v, table, ct, seg, pos):
    return jnp.sum(attend(q, k, v, table, seg, pos).astype(jnp.float32) * ct)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return (lambda q, k, v, ct, table, seg, pos: fwd(q, k, v, table, seg, pos),
          lambda q, k, v, ct, table, seg, pos: grad(q, k, v, table, ct, seg, pos))


def _time(fn, args, repeats: int) -> float:
  """Median seconds of `fn(*args)` after one warm-up (compilation) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _dense_bytes(impl, bias, batch, heads, length) -> int:
  """The float32 [batch, heads, L, L] tensors an implementation holds: the logits
  ('xla' and the reference; cuDNN and flash hold tiles) and the dense bias (all but flash)."""
  tensors = (impl in ("xla", "reference")) + (bias and impl != "flash")
  return tensors * batch * heads * length * length * 4


def _memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def measure(impl, *, length, head_dim, dtype, causal, bias, tokens, width, repeats,
            interpret=None) -> dict:
  batch, heads = max(1, tokens // length), max(1, width // head_dim)
  record = dict(impl=impl, length=length, head_dim=head_dim, batch=batch, heads=heads,
                dtype=jnp.dtype(dtype).name, causal=causal, bias=bias)
  limit = _memory_limit()
  if limit and _dense_bytes(impl, bias, batch, heads, length) > limit // 2:
    return record | dict(skipped="dense logits or bias do not fit in device memory")
  args = _inputs(batch, length, heads, head_dim, dtype)
  flops = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
  fwd, fwd_bwd = _programs(_attention(impl, causal, bias, head_dim ** -0.5, interpret))
  try:
    t_fwd = _time(fwd, args, repeats)
    t_all = _time(fwd_bwd, args, repeats)
  except Exception as e:  # an implementation missing here (cudnn) or out of memory
    return record | dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return record | dict(fwd_ms=1e3 * t_fwd, fwd_tflops=flops / t_fwd / 1e12,
                       fwd_bwd_ms=1e3 * t_all, fwd_bwd_tflops=3 * flops / t_all / 1e12)


def smoke() -> dict:
  """The kernel in interpret mode at tiny sizes against the reference: max errors of
  the output and gradients, and timings."""
  errors = {}
  for causal, bias in ((True, True), (False, False)):
    args = _inputs(1, 80, 2, 64, jnp.float32)
    (f_fwd, f_grad), (r_fwd, r_grad) = (
        _programs(_attention(impl, causal, bias, 0.125, interpret=True))
        for impl in ("flash", "reference"))
    got, want = (f_grad(*args), r_grad(*args))
    name = f"{'causal' if causal else 'bidirectional'}{'+bias' if bias else ''}"
    errors[name] = dict(
        out=float(jnp.abs(f_fwd(*args) - r_fwd(*args)).max()),
        grads=[float(jnp.abs(g - w).max()) for g, w in zip(got, want)])
  timings = [measure(impl, length=128, head_dim=64, dtype=jnp.float32, causal=True, bias=True,
                     tokens=128, width=128, repeats=2, interpret=True)
             for impl in ("flash", "reference")]
  return dict(max_abs_errors=errors, timings=timings)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny interpret-mode check (CPU)")
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--tokens", type=int, default=32768, help="batch x length")
  parser.add_argument("--width", type=int, default=2048, help="heads x head_dim")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  env = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
             jax=jax.__version__, host=platform.node())
  if args.smoke:
    print(json.dumps(env | smoke(), indent=2))
    return
  impls = ["flash", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  results = []
  for head_dim in map(int, args.head_dims.split(",")):
    for length in map(int, args.lengths.split(",")):
      setting = dict(length=length, head_dim=head_dim, dtype=jnp.bfloat16, causal=True,
                     tokens=args.tokens, width=args.width, repeats=args.repeats)
      results += [measure(impl, bias=False, **setting) for impl in impls]
      results += [measure(impl, bias=True, **setting) for impl in ["reference", *impls]]
      print(json.dumps(results[-2 * len(impls) - 1:]), file=sys.stderr, flush=True)
  print(json.dumps(env | dict(results=results), indent=2, default=float))


if __name__ == "__main__":
  main()
