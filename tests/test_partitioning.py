"""Mesh construction, logical-axis rules, and sharded vs unsharded train steps."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ul2x import partitioning
from train_utils import build, copy_batch

RULES = partitioning.standard_logical_axis_rules()


def test_mesh_fills_minus_one_and_rejects_mismatch():
  assert partitioning.mesh_shape_for({"data": -1, "tensor": 2}, 8)["data"] == 4
  with pytest.raises(partitioning.MeshError, match="has 6 devices but there are 8"):
    partitioning.mesh_shape_for({"data": 3, "tensor": 2}, 8)
  with pytest.raises(partitioning.MeshError, match="multiple of 3 devices but there are 8"):
    partitioning.mesh_shape_for({"data": -1, "fsdp": 3}, 8)
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}


def test_logical_rules_map_to_mesh_axes():
  shape = {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
  assert partitioning.logical_to_spec(("embed", "mlp"), RULES, shape) == P("fsdp", "tensor")
  assert partitioning.logical_to_spec(("batch", "length", "embed"), RULES, shape) == P(
      ("data", "fsdp"))  # embed cannot reuse fsdp once batch took it
  # A mesh axis that does not divide the dimension leaves it replicated.
  assert partitioning.logical_to_spec(("heads", "kv"), RULES, shape, (3, 8)) == P()
  with pytest.raises(ValueError, match="logical axis 'embd' has no partitioning rule"):
    partitioning.logical_to_spec(("embd",), RULES, shape)


def _params(state):
  return jax.device_get(state["params"])


def _train(mesh_sizes, steps=2, **kw):
  state, step, sharding = build(mesh_sizes, **kw)
  losses = []
  for i in range(steps):
    state, metrics = step(state, jax.device_put(copy_batch(i), sharding))
    losses.append(float(metrics["loss"]))
  return losses, _params(state), state


@pytest.fixture(scope="module")
def one_device():
  return _train({"data": 1})


def test_sharded_step_equals_single_device(one_device):
  losses, params, _ = one_device
  sharded_losses, sharded_params, state = _train({"data": 2, "fsdp": 2, "tensor": 2})
  # The state really is sharded: a kernel is split over fsdp and tensor.
  wi = state["params"]["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_allclose(losses, sharded_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, sharded_params)


def test_microbatching_equals_full_batch(one_device):
  losses, params, _ = one_device
  micro_losses, micro_params, _ = _train({"data": 1}, num_microbatches=4)
  np.testing.assert_allclose(losses, micro_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, micro_params)
