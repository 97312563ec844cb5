"""The Pallas flash-attention kernel (kernels/flash_attention.py) against the reference
`dot_product_attention` with the dense T5 bias: outputs, log-sum-exp and gradients of
q, k, v and the bias table, per mask kind, dtype, head_dim and grouped-query heads,
in interpret mode on CPU (compiled on GPU / TPU); skipped tiles; input errors; the
model's CPU fallback; and the kernel as ring attention's block function. The cases are
model/kernel_cases.py's (tests/accelerator_compile.py and bench/gpu_registers.py compile
them too)."""

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ul2x import partitioning
from ul2x.kernels import flash_attention as flash
from ul2x.kernels import flash_kernels, flash_tpu
from ul2x.kernels import ring_attention as ring
from ul2x.kernels.attention_inputs import PositionBias, Tokens, visible
from ul2x.kernels.utils import sum_unvarying
from ul2x.model import attention
from ul2x.model.attention import dot_product_attention
from ul2x.model.kernel_cases import (BLOCKS, CASES, MAX_DISTANCE, NUM_BUCKETS, SHARDED_CASE,
                                     Case, inputs, mask_kwargs, relative_bias, run_flash)
from ul2x.model.position import RelativePositionBias, relative_position_bucket
from ul2x.partitioning import topologies
import compilers

def _reference(case: Case, q, k, v, table, q_tok, kv_tok):
  """(out, lse) of the dense reference; k/v heads repeated for grouped queries."""
  group = case.heads // case.kv_heads
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  kw = mask_kwargs(case, q_tok, kv_tok)
  bias = relative_bias(case)(table, q_tok.positions, kv_tok.positions) if case.bias else None
  out = dot_product_attention(q, k, v, bias=bias, **kw)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * 0.3
  logits = logits if bias is None else logits + bias
  mask = visible(q_tok._replace(prefix=kw["q_prefix"]), kv_tok._replace(prefix=kw["kv_prefix"]),
                 kw["causal"])
  return out, jax.nn.logsumexp(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)


@functools.cache
def _grad_fn(attend, case: Case):
  """jit(value_and_grad) w.r.t. q, k, v and the table of sum(out * ct) + sum(lse * ct_lse)
  over the real (non-padding) query rows."""
  def loss(q, k, v, table, ct, ct_lse, q_tok, kv_tok):
    out, lse = attend(case, q, k, v, table, q_tok, kv_tok)
    return (jnp.sum(out.astype(jnp.float32) * ct)
            + jnp.sum(jnp.where(ct_lse != 0, lse, 0.0) * ct_lse), (out, lse))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _assert_close(got, want, tol, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


def _check(case: Case, **flash_kw):
  tensors, cts, tokens = inputs(case)
  real = np.asarray(tokens[0].segment_ids > 0)[..., None, None]
  (_, (want, want_lse)), want_grads = _grad_fn(_reference, case)(*tensors, *cts, *tokens)
  attend = functools.partial(run_flash, **flash_kw) if flash_kw else run_flash
  (_, (got, got_lse)), got_grads = _grad_fn(attend, case)(*tensors, *cts, *tokens)
  tol = 2e-2 if case.dtype == "bfloat16" else 2e-5
  _assert_close(np.asarray(got, np.float32) * real, np.asarray(want, np.float32) * real, tol,
                "out")
  rows = real[..., 0, 0]
  _assert_close(np.swapaxes(got_lse, 1, 2)[rows], np.swapaxes(want_lse, 1, 2)[rows], tol, "lse")
  if not rows.all():  # padding queries see no key: out 0, lse -inf
    assert (np.asarray(got)[~rows] == 0).all()
    assert np.isneginf(np.swapaxes(got_lse, 1, 2)[~rows]).all()
  for name, g, w in zip(("dq", "dk", "dv", "dtable"), got_grads, want_grads):
    _assert_close(g, w, 4 * tol, name)
  if case.bias:
    assert np.abs(np.asarray(want_grads[3])).max() > 1e-2  # the bias gradient is exercised


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpret(name):
  _check(CASES[name])


def test_bfloat16_with_bias_matches_reference_interpret():
  _check(dataclasses.replace(CASES["causal-bias-packed"], dtype="bfloat16", q_len=21,
                             kv_len=21))


def test_tiles_above_the_causal_diagonal_are_skipped():
  """NaN in the last key/value row reaches only the query tile that sees it: every
  other tile holding it lies above the diagonal and is never computed (a computed
  tile spreads it, as 0 * NaN = NaN, to all its rows)."""
  case = CASES["causal-plain-bf16-gqa-d128"]
  (q, k, v, table), _, tokens = inputs(case)
  out, _ = jax.jit(run_flash, static_argnums=0)(case, q, k, v.at[:, -1].set(jnp.nan), table,
                                                 *tokens)
  rows_with_nan = np.flatnonzero(np.isnan(np.asarray(out)).any(axis=(0, 2, 3)))
  np.testing.assert_array_equal(rows_with_nan, np.arange(32, case.q_len))  # last q tile


@pytest.mark.parametrize("change,message", [
    (dict(k=jnp.zeros((1, 8, 2, 32)), v=jnp.zeros((1, 8, 2, 32))), "same batch and head_dim"),
    (dict(k=jnp.zeros((1, 8, 3, 64)), v=jnp.zeros((1, 8, 3, 64))), "not a multiple of 3"),
    (dict(bias_table=jnp.zeros((2, 32))), "bias_table and bucket_fn together"),
    (dict(block_sizes=flash.BlockSizes(24, 16, 16, 16)), "powers of two"),
    (dict(block_sizes=flash.BlockSizes(64, 128, 128, 128), platform="tpu"),
     "'tpu' block sizes must be powers of two >= 128"),
    (dict(platform="xpu"), "platform 'gpu' .* and 'tpu' .*; got platform='xpu'"),
    (dict(kv_positions=jnp.ones((1, 9), jnp.int32)), r"kv segment ids.*\(1, 8\)"),
])
def test_bad_inputs_raise(change, message):
  x, tok = jnp.zeros((1, 8, 2, 64)), jnp.ones((1, 8), jnp.int32)
  kw = dict(q=x, k=x, v=x, q_segment_ids=tok, kv_segment_ids=tok, q_positions=tok,
            kv_positions=tok) | change
  with pytest.raises(ValueError, match=message):
    flash.flash_attention(**kw)


def test_model_falls_back_to_reference_on_cpu_with_a_log_line(caplog):
  """attention='flash' as a stack calls it (bias from `stack_bias`): on CPU, one log
  line and the reference with the dense bias."""
  case = dataclasses.replace(CASES["causal-bias-packed"], q_len=12, kv_len=12)
  (q, k, v, _), _, (q_tok, kv_tok) = inputs(case)
  kw = mask_kwargs(case, q_tok, kv_tok)
  relative = RelativePositionBias(NUM_BUCKETS, MAX_DISTANCE, case.heads, False,
                                  rngs=nnx.Rngs(0))
  bias = attention.stack_bias(relative, q_tok.positions, "flash")
  assert isinstance(bias, PositionBias)
  attention._log_flash_fallback.cache_clear()
  fn = attention.get_attention_fn("flash")
  with caplog.at_level(logging.WARNING):
    got = jax.jit(lambda q, k, v, bias: (fn(q, k, v, bias=bias, **kw),
                                         fn(q, k, v, bias=None, **kw)))(q, k, v, bias)[0]
  assert [r.getMessage() for r in caplog.records if "flash" in r.getMessage()] == [
      "attention='flash' has no compiled kernel on 'cpu': using the reference "
      "dot_product_attention with a dense bias instead."]
  dense = attention.stack_bias(relative, q_tok.positions, "reference")
  want = jax.jit(lambda q, k, v, dense: dot_product_attention(q, k, v, bias=dense, **kw))
  np.testing.assert_array_equal(got, want(q, k, v, dense))


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_model_with_flash_equals_reference(monkeypatch, architecture):
  """A whole model with attention='flash' (the kernels in interpret mode) against
  attention='reference': loss and every parameter's gradient. Encoder-decoder
  (bidirectional with the bias, causal, cross) and a prefix-LM, padded; batch over data
  and heads over tensor, as the model's shard_map splits them."""
  from test_ring_attention import _lm_batch
  from train_utils import TINY, loss_and_grads
  monkeypatch.setitem(attention.ATTENTION_FNS, "flash", functools.partial(
      attention.flash_dot_product_attention, interpret=True))
  cfg = dataclasses.replace(TINY, architecture=architecture, head_dim=16,
                            num_encoder_layers=1, num_decoder_layers=1)
  batch = _lm_batch(20, prefix=architecture == "decoder_only", encoder_length=24)
  loss, grads = loss_and_grads({"data": 1}, cfg, batch)
  flash_loss, flash_grads = loss_and_grads(
      dict(data=2, tensor=2), dataclasses.replace(cfg, attention="flash"), batch)
  np.testing.assert_allclose(float(flash_loss), float(loss), rtol=1e-5)
  # float32 sums in another order: with the tests' LLVM level 1 (conftest.py), jax 0.12.1
  # put one of 1,024 gradients 3.8e-6 off (2e-6 allowed until then).
  jax.tree.map(lambda g, f: np.testing.assert_allclose(f, g, rtol=1e-4, atol=5e-6),
               jax.device_get(grads), jax.device_get(flash_grads))


def test_ring_attention_with_flash_blocks_matches_reference():
  """The kernel as ring attention's block function on sequence=4: causal prefix-LM,
  packed with padding, relative bias; blocks of 12 tokens streamed in tiles of 6."""
  case = dataclasses.replace(CASES["prefix-bias-packed-gqa"], heads=2, kv_heads=2,
                             q_len=48, kv_len=48)
  tensors, (ct, _), tokens = inputs(case)
  mesh = partitioning.create_mesh(data=2, sequence=4)
  buckets = functools.partial(relative_position_bucket, bidirectional=False,
                              num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)
  block = flash.FlashBlockAttention(8, buckets, BLOCKS, interpret=True)

  def ring_attend(case, q, k, v, table, q_tok, kv_tok):
    def shard(q, k, v, table, q_tok, kv_tok):
      q_tok, kv_tok = Tokens(*q_tok), Tokens(*kv_tok)
      return ring.ring_attention(
          q, k, v, bias=PositionBias(table, relative_bias(case)), axis_name="sequence",
          block_attention=block, **mask_kwargs(case, q_tok, kv_tok))
    # check_vma=False: jax 0.10's Pallas interpreter loses varying axes in its grid loop.
    length = P(None, "sequence")
    out = jax.shard_map(shard, mesh=mesh, in_specs=(length,) * 3 + (P(), (length,) * 3,
                                                                    (length,) * 3),
                        out_specs=length, check_vma=False)(q, k, v, table, tuple(q_tok),
                                                           tuple(kv_tok))
    return out, jnp.zeros((q.shape[0], q.shape[2], q.shape[1]))

  real = np.asarray(tokens[0].segment_ids > 0)[..., None, None]
  no_lse = jnp.zeros((case.batch, case.heads, case.q_len))
  (_, (want, _)), want_grads = _grad_fn(_reference, case)(*tensors, ct, no_lse, *tokens)
  (_, (got, _)), got_grads = _grad_fn(ring_attend, case)(*tensors, ct, no_lse, *tokens)
  _assert_close(np.asarray(got) * real, np.asarray(want) * real, 2e-5, "out")
  for name, g, w in zip(("dq", "dk", "dv", "dtable"), got_grads, want_grads):
    _assert_close(g, w, 1e-4, name)


def test_lowers_to_triton_for_gpu():
  """Forward and both backward kernels lower to Triton for CUDA, from this CPU host
  (jax.export; no GPU needed): the kernel bodies use only operations Pallas' Triton
  lowering supports. Compiling Triton to PTX still needs the GPU tests below."""
  case = dataclasses.replace(CASES["prefix-bias-packed-gqa"], dtype="bfloat16", q_len=300,
                             kv_len=300)
  (q, k, v, table), _, tokens = inputs(case)

  def loss(q, k, v, table, q_tok, kv_tok):
    out, lse = run_flash(case, q, k, v, table, q_tok, kv_tok, interpret=False,
                         block_sizes=flash.DEFAULT_BLOCK_SIZES["gpu"])
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  triton = "__gpu$xla.gpu.triton"
  with topologies.gpu_target("NVIDIA H200"):
    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(q, k, v, table, *tokens)
  module = exported.mlir_module()
  for name in ("flash_attention_forward", "flash_attention_dkdv", "flash_attention_dq"):
    assert f'name = "{name}"' in module
  assert module.count(f"custom_call @{triton}") == 3


# The TPU (Mosaic) kernels: interpret mode here, compiled for TPU with libtpu below.

TPU_BLOCKS = flash.BlockSizes(128, 128, 128, 128)  # the smallest TPU tiles


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernels_match_reference_interpret(name):
  _check(CASES[name], block_sizes=TPU_BLOCKS, platform="tpu")


def test_tpu_kernels_match_reference_over_several_tiles_interpret():
  """3 query x 3 key tiles of 128, padded, packed: the tile loop, the prefetched tile
  visibility and the bias-gradient sums across tiles."""
  _check(dataclasses.replace(CASES["prefix-bias-packed-gqa"], q_len=300, kv_len=260),
         block_sizes=TPU_BLOCKS, platform="tpu")


def test_tpu_kernels_split_a_batch_whose_tile_plan_exceeds_smem(monkeypatch):
  """One example per call when the plans would not fit: outputs concatenated, the bias
  table's gradient summed over the calls."""
  monkeypatch.setattr(flash_tpu, "PLAN_BYTES", 4)
  _check(CASES["causal-bias-packed"], block_sizes=TPU_BLOCKS, platform="tpu")


def test_tpu_tiles_above_the_causal_diagonal_are_skipped():
  """As for the GPU kernels: a NaN in the last key reaches only the last query tile."""
  case = dataclasses.replace(CASES["causal-plain-bf16-gqa-d128"], q_len=300, kv_len=300)
  (q, k, v, table), _, tokens = inputs(case)
  attend = functools.partial(run_flash, block_sizes=TPU_BLOCKS, platform="tpu")
  out, _ = jax.jit(attend, static_argnums=0)(case, q, k, v.at[:, -1].set(jnp.nan), table,
                                             *tokens)
  rows_with_nan = np.flatnonzero(np.isnan(np.asarray(out)).any(axis=(0, 2, 3)))
  np.testing.assert_array_equal(rows_with_nan, np.arange(256, case.q_len))


def test_tpu_tile_plan_fetches_visible_tiles_and_repeats_one_for_skipped_ones():
  """The prefetched plan: 2 x the tile to fetch + 1 if visible. A skipped tile fetches
  the last visible one before it (the first after it at the start of a row), so the
  block index does not change and nothing is copied. Causal, 4 x 4 tiles of 128;
  unpacked, then two packed segments of 256."""
  st = flash_kernels.Config(True, False, 1.0, None, 1, TPU_BLOCKS, True, "tpu")
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")  # q tile, kv tile
  one = lambda seg, pos: Tokens(jnp.asarray(seg, jnp.int32)[None], jnp.asarray(pos)[None])
  tokens = one(np.ones(512), np.arange(512))
  plan = lambda tok, streamed: np.asarray(flash_tpu.plan(st, tok, tok, 128, 128, streamed)[0])
  np.testing.assert_array_equal(plan(tokens, 2), 2 * np.minimum(i, j) + (j <= i))
  np.testing.assert_array_equal(plan(tokens, 1), 2 * np.maximum(i, j) + (j <= i))
  packed = one(np.repeat([1, 2], 256), np.tile(np.arange(256), 2))
  np.testing.assert_array_equal(plan(packed, 2), [[1, 0, 0, 0], [1, 3, 2, 2],
                                                  [4, 4, 5, 4], [4, 4, 5, 7]])


def test_gradients_of_replicated_inputs_are_summed_over_the_shards():
  """`sum_unvarying` inside shard_map with the varying-axes check on (what the compiled
  kernels run under; interpret mode turns the check off): the gradient of an input
  replicated over `data` is summed over `data`; one of a sharded input is left alone."""
  mesh = partitioning.create_mesh(data=2, fsdp=4)
  x, table = jnp.arange(8.0), jnp.zeros(4)

  def shard(x, table):
    return sum_unvarying(x, table), sum_unvarying(x, x)

  summed, same = jax.shard_map(shard, mesh=mesh, in_specs=(P("data"), P()),
                               out_specs=(P(), P("data")))(x, table)
  np.testing.assert_array_equal(summed, x[:4] + x[4:])
  np.testing.assert_array_equal(same, x)


COMPILERS = {  # topology: (what `make` target installs its compiler, device kind)
    "v5e:2x2": ("libtpu", "TPU v5 lite"),
    "h200:4": ("cuda_plugin", "NVIDIA H200"),
}


@pytest.mark.parametrize("topology", list(COMPILERS))
def test_kernels_compile_for_accelerators_this_host_lacks(topology, tmp_path):
  """With the platform's own compiler, on this host without a TPU or GPU (a subprocess,
  so the compiler stays out of this process): forward, dK/dV and dQ of every flash case
  compile (Mosaic for a TPU v5e; Triton to PTX for an H200); so do the model's
  flash path in its shard_map over 4 devices with the varying-axes check on, gathering
  nothing, and the model's ring attention on sequence=4 with the flash kernels as its
  blocks. The grouped matmul's 'pallas' kernels (tests/test_grouped_matmul_pallas.py)
  compile with no dense product over all experts, where XLA's ragged_dot has one, and
  so does the dropless MoE layer with them in its shard_map, over data x expert and
  expert x tensor. And the model's flash path on one device, where nothing varies in
  its shard_map (the kernels' outputs must still carry the manual axes' type)."""
  target, kind = COMPILERS[topology]
  if reason := compilers.missing(target):
    pytest.skip(reason)
  env = dict(os.environ, PYTHONPATH=str(compilers.compiler_folder(target)), TPU_SKIP_MDS_QUERY="1",
             JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")  # no TPU to lock
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # XLA compiles (and dumps PTX) every case
  # As a user's job compiles: with the LLVM passes conftest.py leaves out for CPU tests.
  env["XLA_FLAGS"] = re.sub(r"--xla_(backend_optimization_level|llvm_disable_expensive_passes)"
                            r"=\S+", "", env.get("XLA_FLAGS", ""))
  gpu = kind.startswith("NVIDIA")
  if gpu:  # XLA writes the PTX it compiles to binaries: the kernels' entry points
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path}"
  try:
    run = subprocess.run([sys.executable, "accelerator_compile.py", topology], env=env,
                         cwd=pathlib.Path(__file__).parent, capture_output=True, text=True,
                         timeout=900)
  except subprocess.TimeoutExpired:
    pytest.fail(f"tests/accelerator_compile.py took over 900 s to compile for {topology}")
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
  assert [line["case"] for line in lines] == [
      *CASES, "model-flash-sharded", "model-flash-one-device", "model-ring",
      "grouped-matmul-ragged_dot",
      "grouped-matmul-pallas", "model-moe-dropless-pallas-data2-expert2",
      "model-moe-dropless-pallas-expert2-tensor2"]
  assert all(line["device_kind"] == kind for line in lines)
  assert all(line["kernels"] == 3 for line in lines[:-5])  # the flash cases, both models
  ptx = "".join(p.read_text() for p in tmp_path.glob("*.ptx")) if gpu else None
  shutil.rmtree(tmp_path)  # XLA's dumps of every module and pass
  flash, _one_device, ring, ragged, pallas, *moe = lines[-7:]
  assert flash["all_gathers"] == 0
  assert ring["kernels"] >= 3  # the ring's steps run the flash kernels
  # XLA's ragged_dot computes dW densely over the 8 experts; the Pallas dW kernel does not
  assert ragged["dense_group_products"] >= 1 and ragged["dw_kernels"] == 0
  assert pallas["dw_kernels"] == 1 and pallas["dense_group_products"] == 0
  assert all(m["kernels"] >= 1 for m in moe)
  if gpu and not ptx and lines[0]["code_bytes"] == 0:
    pytest.skip(f"jax {jax.__version__}'s compile-only GPU compile generates no code (0 "
                "bytes, no PTX dumped): the kernels' PTX entry points cannot be checked here; "
                "everything above was")
  if gpu:
    assert {"flash_attention_forward", "flash_attention_dkdv", "flash_attention_dq",
            "grouped_matmul", "grouped_matmul_weight_grad"} <= set(
                re.findall(r"\.entry (\w+)\(", ptx))


COMPILED_CASES = {
    name: dataclasses.replace(case, q_len=case.q_len * 27, kv_len=case.kv_len * 27)
    for name, case in CASES.items()}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton kernel)")
@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_matches_reference_gpu(name):
  _check(COMPILED_CASES[name], interpret=False, block_sizes=None)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic kernel)")
@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_matches_reference_tpu(name):
  _check(COMPILED_CASES[name], interpret=False, block_sizes=None)


# The model's flash path under a sharded mesh (interpret mode on the simulated CPU devices).

MESH_RULES = partitioning.standard_logical_axis_rules()


def _model_flash(mesh, case: Case, q, k, v, table, q_tok, kv_tok):
  """(out, zero lse) of the model's flash path in interpret mode under axis_rules."""
  with partitioning.axis_rules(mesh, MESH_RULES):
    out = attention.flash_dot_product_attention(
        q, k, v, bias=PositionBias(table, relative_bias(case)), interpret=True,
        **mask_kwargs(case, q_tok, kv_tok))
  return out, jnp.zeros((q.shape[0], q.shape[2], q.shape[1]))


def test_model_flash_shards_batch_and_heads_without_gathering():
  """On data=2, fsdp=2, tensor=2 the model's flash path runs in a shard_map over batch
  (data+fsdp) and heads (tensor; grouped k/v heads and the bias table alike): outputs
  and gradients of q, k, v and the table equal the unsharded reference with the dense
  bias, and the compiled step gathers nothing."""
  case = SHARDED_CASE
  tensors, (ct, _), tokens = inputs(case)
  no_lse = jnp.zeros((case.batch, case.heads, case.q_len))
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  x, tok = P(("data", "fsdp"), None, "tensor"), P(("data", "fsdp"))
  args = (*(put(a, x) for a in tensors[:3]), put(tensors[3], P("tensor")), put(ct, x), no_lse,
          put(tokens[0], tok), put(tokens[1], tok))
  compiled = _grad_fn(functools.partial(_model_flash, mesh), case).lower(*args).compile()
  assert "all-gather" not in compiled.as_text()
  (_, (got, _)), got_grads = compiled(*args)
  (_, (want, _)), want_grads = _grad_fn(_reference, case)(*tensors, ct, no_lse, *tokens)
  real = np.asarray(tokens[0].segment_ids > 0)[..., None, None]
  _assert_close(np.asarray(got) * real, np.asarray(want) * real, 2e-5, "out")
  for name, g, w in zip(("dq", "dk", "dv", "dtable"), got_grads, want_grads):
    _assert_close(g, w, 1e-4, name)


@pytest.mark.parametrize("mesh_sizes,kv_heads,message", [
    (dict(data=2, sequence=4), 2, "needs whole sequences per device.*use attention='ring'"),
    (dict(data=2, tensor=4), 2, "the 2 key/value heads are not a multiple of 4"),
])
def test_model_flash_rejects_length_sharding_and_indivisible_kv_heads(mesh_sizes, kv_heads,
                                                                      message):
  case = dataclasses.replace(SHARDED_CASE, kv_heads=kv_heads, q_len=16, kv_len=16)
  tensors, _, tokens = inputs(case)
  mesh = partitioning.create_mesh(**mesh_sizes)
  with pytest.raises(ValueError, match=message) as error:
    jax.eval_shape(functools.partial(_model_flash, mesh, case), *tensors, *tokens)
  assert "\n" not in str(error.value)
