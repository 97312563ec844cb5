"""Mesh construction, logical-axis rules, and sharded vs unsharded train steps."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ul2x import partitioning
from ul2x.partitioning import param_names, report
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup
from train_utils import TINY, build, copy_batch

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


MESH_222 = {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}


def test_additional_rules_take_precedence_over_the_standard_ones():
  rules = partitioning.standard_logical_axis_rules(
      additional_rules=[("vocab", None), ("embed", ("fsdp", "tensor")), ("new", "data")])
  assert partitioning.logical_to_spec(("vocab", "embed"), rules, MESH_222) == P(
      None, ("fsdp", "tensor"))  # vocab no longer falls through to the standard 'tensor'
  assert partitioning.logical_to_spec(("heads", "new"), rules, MESH_222) == P("tensor", "data")
  job = setup(TINY, mesh=partitioning.create_mesh(**MESH_222),
              rules=partitioning.standard_logical_axis_rules(additional_rules=[("vocab", None)]))
  assert job.shardings["params"]["embed"]["embedding"].spec == P(None, "fsdp")
  with pytest.raises(ValueError, match=r"has the rule \('vocab', 'tensr'\); write each"):
    partitioning.standard_logical_axis_rules(additional_rules=[("vocab", "tensr")])


def test_byte_limit_takes_whole_numbers_of_bytes_from_gin():
  option = "train.max_replicated_param_bytes"
  assert report.byte_limit(None, option) is None
  assert report.byte_limit(1048576, option) == 1048576
  limit = report.byte_limit(1e6, option)  # gin reads 1e6 as a float
  assert limit == 1000000 and isinstance(limit, int)
  for bad in (1.5, -1, -1.0, True, "1MB", float("inf"), float("nan")):
    with pytest.raises(ValueError, match=rf"^train.max_replicated_param_bytes={bad!r} is not "
                       r"a number of bytes; pass a whole number of bytes, e\.g\. "
                       r"--gin.train.max_replicated_param_bytes=1048576 \(or 1e6\)"):
      report.byte_limit(bad, option)


def test_param_names_join_keys_with_slashes_in_jax_order():
  """The one spelling of checkpoint restores, export mappings and the report: int layer
  keys and sequence indices as digits, in the order jax flattens, so the names' values
  rebuild the tree."""
  tree = {"encoder": {"layers": {10: {"kernel": 1}, 2: {"kernel": 2}}}, "opt": [3, (4,)]}
  names = param_names.flat_names(tree)
  assert list(names) == ["encoder/layers/2/kernel", "encoder/layers/10/kernel", "opt/0",
                         "opt/1/0"]
  assert jax.tree.unflatten(jax.tree.structure(tree), list(names.values())) == tree


def test_replicated_report_names_an_unshardable_parameter():
  # 3 heads do not divide over tensor=2, and fsdp=1 leaves embed nothing to shard over.
  job = setup(dataclasses.replace(TINY, num_heads=3),
              mesh=partitioning.create_mesh(data=4, tensor=2))
  specs = jax.tree.map(lambda s: s.spec, job.shardings["params"])
  params = job.abstract_state()["params"]
  replicated = report.replicated_params(params, job.param_axes, specs, job.mesh, job.rules)
  by_path = {p.path: p for p in replicated}
  query = by_path["encoder/layers/0/self_attention/query/kernel"]
  assert query.shape == (32, 3, 8) and query.nbytes == 32 * 3 * 8 * 4
  assert "mesh axes {'tensor': 2}, but no dimension of (32, 3, 8) divides" in query.reason
  assert "no rule maps its axes ('embed',)" in by_path["encoder_norm/scale"].reason
  assert "encoder/layers/0/mlp/wi_0/kernel" not in by_path  # (embed, mlp): mlp on tensor
  assert replicated[0].nbytes == max(p.nbytes for p in replicated)
  assert report.replicated_summary(replicated, 52).startswith(
      f"replicated parameters: {len(replicated)} of 52, ")
  report.check_replicated(replicated, replicated[0].nbytes, "train.max_replicated_param_bytes")
  with pytest.raises(ValueError, match=rf"parameter {replicated[0].path} .* stays replicated "
                     r"on every device .* over train.max_replicated_param_bytes=100; "):
    report.check_replicated(replicated, 100, "train.max_replicated_param_bytes")
  # A mesh that shards no parameter axis (pure data parallel) reports nothing.
  data_only = setup(TINY, mesh=partitioning.create_mesh(data=8))
  assert report.replicated_params(
      data_only.abstract_state()["params"], data_only.param_axes,
      jax.tree.map(lambda s: s.spec, data_only.shardings["params"]), data_only.mesh,
      data_only.rules) == []


def test_model_info_lists_every_leaf_with_its_spec_and_sizes():
  job = setup(TINY, mesh=partitioning.create_mesh(**MESH_222), optimizer=create_optimizer(10))
  text = report.model_info(job.abstract_state(), job.shardings, job.param_axes, job.mesh)
  lines = text.splitlines()
  assert lines[0] == "# mesh: data=2 fsdp=2 expert=1 sequence=1 tensor=2 (8 devices)"
  wi = next(l for l in lines if l.startswith("params/encoder/layers/0/mlp/wi_0/kernel "))
  assert wi.split()[-2:] == [str(32 * 64 * 4), str(32 * 64)]  # global, per device (/4)
  assert "(32, 64)" in wi and "('embed', 'mlp')" in wi and "P('fsdp', 'tensor')" in wi
  leaves = len(jax.tree.leaves(job.abstract_state()))
  assert sum(not l.startswith("#") and l.strip() != "" for l in lines) == leaves + 1  # + header
  assert any(l.startswith("# opt_state: ") for l in lines)


def test_optimizer_state_is_sharded_like_its_parameter():
  # emb = mlp = 128: Adafactor factors the square MLP kernels, where the shapes of v_row
  # and v_col alone cannot say which dimension each dropped.
  cfg = dataclasses.replace(TINY, emb_dim=128, mlp_dim=128, vocab_size=256,
                            num_encoder_layers=1, num_decoder_layers=1)
  mesh = partitioning.create_mesh(**MESH_222)
  # AdamW's moments: every one has its parameter's sharding (the state is created by
  # jit with these as out_shardings, as the Adafactor arrays below show).
  adamw = setup(cfg, mesh=mesh, optimizer=create_optimizer(10, name="adamw"))
  params = adamw.shardings["params"]
  moments = [s for s in jax.tree.leaves(adamw.shardings["opt_state"], is_leaf=lambda x: hasattr(
      x, "mu")) if hasattr(s, "mu")][0]
  for moment in (moments.mu, moments.nu):
    jax.tree.map(lambda m, p: _assert_spec(m, p.spec), moment, params)
  assert params["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"].spec == P("fsdp", "tensor")

  adafactor = setup(cfg, mesh=mesh, optimizer=create_optimizer(10, name="adafactor"))
  state = adafactor.init_state()
  assert state["params"]["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"].shape == (128, 128)
  factored = state["opt_state"][0]
  kernel = lambda tree: tree["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"]
  # optax: v_row drops the largest dim (of equal ones, the last), v_col the second largest.
  _assert_spec(kernel(factored.v_row), P("fsdp"))
  _assert_spec(kernel(factored.v_col), P("tensor"))
  # The embedding (vocab 256, embed 128): v_row keeps embed, v_col keeps vocab.
  _assert_spec(factored.v_row["embed"]["embedding"], P("fsdp"))
  _assert_spec(factored.v_col["embed"]["embedding"], P("tensor"))
  # Unfactored attention kernels (128, 2, 8) keep the parameter's spec in v.
  _assert_spec(factored.v["encoder"]["layers"][0]["self_attention"]["query"]["kernel"],
               P("fsdp", "tensor"))


def _assert_spec(x, spec):
  """`x`: an array, or a NamedSharding (AdamW's, checked without building the state)."""
  actual = x.spec if isinstance(x, jax.sharding.NamedSharding) else x.sharding.spec
  assert actual == spec, (x, actual, spec)
