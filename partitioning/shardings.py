"""Shardings for parameters, optimizer state, batches, and activation constraints."""

import contextlib
import math
import threading

import jax
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ul2x.partitioning.rules import logical_to_spec, mesh_axes

_CONTEXT = threading.local()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules):
  """While active, `constrain` pins activations to shardings from `rules` on `mesh`."""
  previous = getattr(_CONTEXT, "value", None)
  _CONTEXT.value = (mesh, rules)
  try:
    yield
  finally:
    _CONTEXT.value = previous


def current_axis_rules():
  """(mesh, rules) of the innermost active `axis_rules`, or None outside one."""
  return getattr(_CONTEXT, "value", None)


def current_split(name: str):
  """(mesh, rules, the mesh axis or axes the rules split logical axis `name` over or None,
  how many shards that makes) under the innermost `axis_rules`; (None, None, None, 1)
  outside one."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return None, None, None, 1
  mesh, rules = context
  spec = logical_to_spec((name,), rules, dict(mesh.shape))
  axis = spec[0] if len(spec) else None
  return mesh, rules, axis, math.prod(mesh.shape[a] for a in mesh_axes(axis))


def constrain(x, names):
  """Sharding constraint by logical axis names; a no-op outside `axis_rules`."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return x
  mesh, rules = context
  spec = logical_to_spec(names, rules, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def logical_axes(state: nnx.State) -> dict:
  """Pure dict (like `nnx.to_pure_dict(state)`) of each variable's `axes` metadata or None."""
  flat = {path: var.get_metadata().get("axes") for path, var in nnx.to_flat_state(state)}
  return traverse_util.unflatten_dict(flat)


def param_specs(abstract_params, axes, mesh: Mesh, rules):
  """PartitionSpecs for a (pure dict) param tree given matching logical axes."""
  mesh_shape = dict(mesh.shape)

  def spec(x, names):
    if names is None:
      return PartitionSpec()
    if len(names) != x.ndim:
      raise ValueError(f"axes {names} do not match a parameter of shape {x.shape}.")
    return logical_to_spec(names, rules, mesh_shape, x.shape)

  return jax.tree.map(spec, abstract_params, axes,
                      is_leaf=lambda x: x is None or isinstance(x, tuple))


_FACTORED_FIELDS = ("v_row", "v_col")  # optax Adafactor's factored second moments


def _derived_spec(leaf, param, spec: PartitionSpec, field: str | None) -> PartitionSpec:
  """The spec of an optimizer-state leaf that mirrors (or factors) a parameter; `field`
  is the name of the state field that holds it (e.g. Adafactor's 'v_row')."""
  if not hasattr(leaf, "shape"):
    return PartitionSpec()
  full = tuple(spec) + (None,) * (len(param.shape) - len(spec))
  if leaf.shape == param.shape:
    return spec
  if leaf.ndim == param.ndim - 1:  # factored second moments drop one dim
    dropped = [i for i in range(param.ndim)
               if param.shape[:i] + param.shape[i + 1:] == leaf.shape]
    if field in _FACTORED_FIELDS and len(dropped) > 1:
      # Equal sizes leave the shape ambiguous; optax's Adafactor drops the largest
      # dimension for v_row and the second largest for v_col (its `_factored_dims`).
      second, largest = (int(i) for i in np.argsort(param.shape)[-2:])
      dropped = [largest if field == "v_row" else second]
    if dropped:
      i = dropped[0]
      return PartitionSpec(*(full[:i] + full[i + 1:]))
  return PartitionSpec()


class _ParamRef:
  """A parameter and its spec, carried to the optimizer-state leaves that mirror it
  (not a pytree, so `tree_map_with_path` sees it as one leaf)."""

  def __init__(self, param=None, spec=None):
    self.param, self.spec = param, spec


def _field(path) -> str | None:
  """The innermost attribute name on a state leaf's path, e.g. 'mu' or 'v_row'."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else None


def opt_state_specs(tx: optax.GradientTransformation, abstract_opt_state, abstract_params,
                    specs):
  """Optimizer-state specs: param-shaped leaves follow their parameter, factored ones
  drop the factored dimension's axis, the rest replicate."""
  refs = optax.tree_map_params(
      tx, lambda _, p, s: _ParamRef(p, s), abstract_opt_state, abstract_params, specs,
      transform_non_params=lambda _: _ParamRef(), is_leaf=lambda x: isinstance(x, PartitionSpec))

  def spec(path, leaf, ref):
    if ref.param is None:
      return PartitionSpec()
    return _derived_spec(leaf, ref.param, ref.spec, _field(path))

  return jax.tree_util.tree_map_with_path(spec, abstract_opt_state, refs)


def to_named(specs, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(rules, mesh: Mesh, ndim: int = 2) -> PartitionSpec:
  """Spec of a [batch, length, ...] input array."""
  names = ("batch", "length") + (None,) * (ndim - 2)
  return logical_to_spec(names[:ndim], rules, dict(mesh.shape))
