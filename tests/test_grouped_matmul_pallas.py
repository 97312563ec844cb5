"""The Pallas grouped matmul (kernels/grouped_matmul_pallas.py for GPU, its TPU dW kernel in
kernels/grouped_matmul_tpu.py) against its reference twin, `jax.lax.ragged_dot`
(kernels/grouped_matmul.py): outputs and gradients in interpret mode on CPU, the Triton
lowering for CUDA from this host, the dropless MoE layer with `moe_matmul='pallas'` on
one device and expert-parallel, and the compiled kernel on a GPU. Compiling for a TPU
and an H200: tests/accelerator_compile.py."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from test_moe_dropless import MESHES, RULES, layer, layer_loss
from ul2x import partitioning
from ul2x.kernels import grouped_matmul_pallas as gp
from ul2x.kernels import grouped_matmul_tpu as gt
from ul2x.kernels.grouped_matmul import grouped_matmul
from ul2x.model.moe import select_grouped_matmul
from ul2x.partitioning import topologies

TINY = gp.Blocks(16, 16, 16)
SIZES = {  # group sizes of 70 rows, 16-row tiles
    "ragged": [0, 17, 1, 0, 30, 9],  # empty groups, groups inside and across tiles, 13 rows left
    "one_group": [70],
    "all_empty": [0, 0, 0],
    "aligned": [16, 32, 0, 22],
}


def _inputs(sizes, dtype, m=70, k=40, n=24, seed=0):
  rng = np.random.default_rng(seed)
  x, w, ct = (jnp.asarray(rng.normal(size=s), dtype)
              for s in ((m, k), (len(sizes), k, n), (m, n)))
  return x, w, jnp.asarray(sizes, jnp.int32), ct


def _value_and_grads(fn, x, w, sizes, ct):
  loss = lambda x, w: jnp.sum(fn(x, w, sizes).astype(jnp.float32) * ct.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1))(x, w), fn(x, w, sizes)


def _check(fn, x, w, sizes, ct, tol):
  (loss, grads), out = _value_and_grads(fn, x, w, sizes, ct)
  f32 = lambda a: a.astype(jnp.float32)
  (loss_r, grads_r), out_r = _value_and_grads(
      grouped_matmul, *(f32(a) for a in (x, w)), sizes, f32(ct))
  scale = lambda a: tol * max(1.0, float(jnp.max(jnp.abs(a))))
  np.testing.assert_allclose(f32(out), out_r, atol=scale(out_r))
  for name, g, r in zip(("dx", "dw"), grads, grads_r):
    assert g.dtype == (x if name == "dx" else w).dtype
    np.testing.assert_allclose(f32(g), r, atol=scale(r), err_msg=name)
  total = int(jnp.sum(sizes))
  assert not np.any(np.asarray(out[total:])) and not np.any(np.asarray(grads[0][total:]))


@pytest.mark.parametrize("name", list(SIZES))
def test_pallas_grouped_matmul_matches_ragged_dot_interpret(name):
  """Outputs, dX and dW equal ragged_dot's; rows past the groups give zeros and get no
  gradient; empty groups get a zero dW."""
  _check(lambda x, w, s: gp.grouped_matmul(x, w, s, TINY, True),
         *_inputs(SIZES[name], jnp.float32), tol=1e-5)


def test_pallas_grouped_matmul_bfloat16_interpret():
  _check(lambda x, w, s: gp.grouped_matmul(x, w, s, TINY, True),
         *_inputs(SIZES["ragged"], jnp.bfloat16), tol=3e-2)


# The TPU variant: ragged_dot's forward and dX, the Mosaic dW kernel in TPU interpret mode
# (uninitialised buffers are NaN, so a block never written or read before it is set shows).
TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)


@pytest.mark.parametrize("name", ["ragged", "all_empty", "aligned"])
def test_tpu_weight_gradient_kernel_matches_ragged_dot_interpret(name):
  """K and N of 140 and 130 give 2 x 2 (K, N) tiles of 128 per expert."""
  _check(lambda x, w, s: gt.grouped_matmul(x, w, s, gt.INTERPRET_BLOCKS, TPU_INTERPRET),
         *_inputs(SIZES[name], jnp.float32, k=140, n=130), tol=1e-5)


def test_tpu_visit_plan():
  """(group, row tile, active) per visit: each group's tiles in order, one for an empty
  group, a tile shared by two groups visited for each, then inactive repeats."""
  plan = gt.visit_plan(jnp.asarray(SIZES["ragged"], jnp.int32), num_tiles=5, bm=16)
  # rows: g1 [0, 17), g2 [17, 18), g4 [18, 48), g5 [48, 57); empty g0 at 0, g3 at 18
  assert plan.tolist() == [[0, 1, 1, 2, 3, 4, 4, 5] + [5] * 9,
                           [0, 0, 1, 1, 1, 1, 2, 3] + [3] * 9,
                           [1] * 8 + [0] * 9]


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_weight_gradient_of_an_expert_ignores_other_experts_rows(variant):
  """An inf in one expert's cotangent rows leaves the dW of an expert sharing its row
  tile finite and exact (the kernels mask both operands)."""
  x, w, sizes, ct = _inputs(SIZES["ragged"], jnp.float32, k=140, n=130)
  fn = (functools.partial(gp.grouped_matmul, blocks=TINY, interpret=True) if variant == "gpu"
        else functools.partial(gt.grouped_matmul, blocks=gt.INTERPRET_BLOCKS,
                               interpret=TPU_INTERPRET))
  dw = lambda ct: jax.grad(lambda w: jnp.sum(fn(x, w, sizes) * ct))(w)
  poisoned = dw(ct.at[17].set(jnp.inf))  # row 17: expert 2, in the row tile of 1 and 4
  clean = dw(ct.at[17].set(0.0))
  others = np.array([0, 1, 3, 4, 5])
  np.testing.assert_array_equal(poisoned[others], clean[others])


def test_tile_groups_lists_the_groups_meeting_each_tile():
  starts, ends = gp.group_bounds(jnp.asarray(SIZES["ragged"], jnp.int32))
  lo, hi = gp.tile_groups(starts, ends, 5, 16)
  # rows: g1 [0, 17), g2 [17, 18), g4 [18, 48), g5 [48, 57); empty g0, g3 at 0 and 18
  assert [list(range(a, b)) for a, b in zip(lo.tolist(), hi.tolist())] == [
      [1], [1, 2, 3, 4], [4], [5], []]


def test_pallas_grouped_matmul_lowers_to_triton_for_gpu():
  """The forward, dX and dW kernels lower to Triton for CUDA from this CPU host
  (jax.export), at sizes that are not multiples of the default blocks, padded to
  whole-array blocks that are not powers of two (K 320, 5 groups)."""
  x, w, sizes, _ = _inputs([40, 0, 90, 170, 0], jnp.bfloat16, m=300, k=300, n=520)
  loss = lambda x, w: jnp.sum(gp.grouped_matmul(x, w, sizes).astype(jnp.float32))
  triton = "__gpu$xla.gpu.triton"
  with topologies.gpu_target("NVIDIA H200"):
    module = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(x, w).mlir_module()
  assert module.count(f"custom_call @{triton}") == 3
  assert module.count('name = "grouped_matmul"') == 2  # forward and dX
  assert module.count('name = "grouped_matmul_weight_grad"') == 1


def test_pallas_falls_back_to_ragged_dot_with_one_log_line(caplog):
  with caplog.at_level(logging.WARNING):
    fn = select_grouped_matmul("pallas", "cpu")
  assert fn is grouped_matmul
  assert "moe_matmul='pallas' has no compiled grouped-matmul kernel on 'cpu'" in caplog.text
  with pytest.raises(ValueError, match="'einsum' is not one of"):
    select_grouped_matmul("einsum", "gpu")


def _layer_pair():
  """(ragged_dot layer, Pallas interpret-mode layer) with the same parameters."""
  reference = layer("top2")
  kernel = layer("top2", moe_matmul="pallas")
  kernel.interpret_kernels = True
  nnx.update(kernel, nnx.state(reference))
  return reference, kernel


@pytest.mark.parametrize("mesh_name", [None, "data2_expert4"])
def test_dropless_layer_with_pallas_matmul_equals_ragged_dot(mesh_name):
  """moe_matmul='pallas': the dropless layer's output, sown values and gradients equal
  the ragged_dot layer's, on one device and with experts sharded over 'expert'."""
  reference, kernel = _layer_pair()
  x = jax.random.normal(jax.random.key(3), (8, 8, 16))
  segment_ids = jnp.ones(x.shape[:2], jnp.int32).at[0, 6:].set(0)
  mesh = None if mesh_name is None else partitioning.create_mesh(**MESHES[mesh_name][0])
  rules = None if mesh is None else RULES
  results, kernels = [], []
  for moe in (reference, kernel):
    graphdef, state = nnx.split(moe)
    fn = layer_loss(graphdef, segment_ids, rules, mesh)
    kernels.append(str(jax.make_jaxpr(fn)(state, x)).count("name=grouped_matmul"))
    results.append(fn(state, x))
  assert kernels[0] == 0 and kernels[1] >= 9  # 3 matmuls, each with forward, dX and dW
  ((loss, (y, sown)), grads), ((loss_k, (y_k, sown_k)), grads_k) = results
  np.testing.assert_allclose(loss_k, loss, rtol=1e-5)
  np.testing.assert_allclose(y_k, y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), (sown_k, grads_k),
               (sown, grads))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton kernel)")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-2), (jnp.bfloat16, 3e-2)])
def test_compiled_pallas_grouped_matmul_matches_ragged_dot_on_gpu(dtype, tol):
  """The Triton kernels at the default blocks (float32 dots run in TF32 on GPU)."""
  _check(lambda x, w, s: gp.grouped_matmul(x, w, s),
         *_inputs([40, 0, 90, 170, 1], dtype, m=320, k=200, n=520), tol=tol)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic kernel)")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-2), (jnp.bfloat16, 3e-2)])
def test_compiled_tpu_grouped_matmul_matches_ragged_dot_on_tpu(dtype, tol):
  """The Mosaic dW kernel at the default blocks, with XLA's ragged_dot forward and dX."""
  _check(lambda x, w, s: gt.grouped_matmul(x, w, s),
         *_inputs([40, 0, 90, 170, 1], dtype, m=320, k=256, n=512), tol=tol)
