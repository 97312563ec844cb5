"""The one setup path every job shares: mesh, rules, model, state shardings, restore.

Train, eval, infer, export, the benches and the tests all call `setup()`, and differ
only in what they do with the `Setup` it returns. Importing this module imports
neither TensorFlow nor seqio.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ul2x import partitioning
from ul2x.model import TransformerConfig, build_model
from ul2x.trainer import checkpoints
from ul2x.trainer.steps import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jitted fns are cached per job
class Setup:
  """A model laid out on a mesh. `state` is {'step', 'params', 'opt_state'} with an
  optimizer, {'step', 'params'} without one (eval, infer, export)."""

  cfg: TransformerConfig
  mesh: Mesh
  rules: list
  graphdef: nnx.GraphDef
  init_fn: object  # () -> state; jit it with `shardings` as out_shardings
  shardings: dict  # state leaf -> NamedSharding
  tx: object = None  # optax.GradientTransformation, or None
  schedule: object = None  # step -> learning rate, or None
  param_axes: dict = None  # like state['params']: each parameter's logical axis names or None

  @property
  def batch_sharding(self) -> NamedSharding:
    """Sharding of every [batch, length] input feature."""
    return NamedSharding(self.mesh, partitioning.batch_spec(self.rules, self.mesh))

  @functools.cached_property
  def _abstract_state(self):
    return jax.eval_shape(self.init_fn)

  def abstract_state(self):
    """The state's shapes and dtypes (traced once per setup: start-up asks several times)."""
    return self._abstract_state

  def abstract_batch(self, batch_size: int, lengths: dict[str, int]) -> dict:
    """The global batch the train step takes: each feature int32 [batch_size, length]
    (`lengths` as from `pipeline.feature_lengths_for`), laid out by `batch_sharding`."""
    return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=self.batch_sharding)
            for k, n in lengths.items()}

  def init_state(self):
    """A freshly initialised state, laid out by `shardings`."""
    return jax.jit(self.init_fn, out_shardings=self.shardings)()

  def restore_state(self, path: str, step: int | None = None):
    """The state saved at `step` (default: the latest) under `path` (a MODEL_DIR, its
    checkpoints/ or one step's directory), placed by `shardings`: all of it, or
    {'step', 'params'} for a setup without an optimizer."""
    directory, step = checkpoints.find_checkpoint(path, step)
    restored, _ = checkpoints.restore(directory, step, self.abstract_state(), self.shardings)
    return restored

  def global_batch(self, local: dict) -> dict:
    """This host's numpy batch -> global arrays laid out by `batch_sharding`."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}

  def train_step(self, *, donate: bool = True, **kwargs):
    """The jitted `train_step(state, batch) -> (state, metrics)`; kwargs go to
    `make_train_step` (num_microbatches, z_loss, moe_aux_loss, ...)."""
    fn = make_train_step(self.graphdef, self.tx, self.schedule, mesh=self.mesh,
                         rules=self.rules, **kwargs)
    return jax.jit(fn, in_shardings=(self.shardings, self.batch_sharding),
                   out_shardings=(self.shardings, None), donate_argnums=0 if donate else ())

  def eval_step(self, *, z_loss: float = 1e-4):
    """The jitted `eval_step(params, batch) -> token sums`."""
    fn = make_eval_step(self.graphdef, mesh=self.mesh, rules=self.rules, z_loss=z_loss)
    return jax.jit(fn, in_shardings=(self.shardings["params"], self.batch_sharding))


def setup(cfg: TransformerConfig, *, mesh: Mesh | None = None, rules=None, optimizer=None,
          seed: int = 0) -> Setup:
  """Builds the model abstractly and derives the state's shardings.

  mesh: default `partitioning.create_mesh()` (gin-configured); rules: default
  `partitioning.standard_logical_axis_rules()`; optimizer: `(tx, schedule)` as from
  `create_optimizer`, or None for a params-only state.
  """
  mesh = partitioning.create_mesh() if mesh is None else mesh
  rules = partitioning.standard_logical_axis_rules() if rules is None else rules
  tx, schedule = optimizer if optimizer is not None else (None, None)
  abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(seed)))
  graphdef, abstract = nnx.split(abstract_model)
  abstract_params = nnx.to_pure_dict(abstract)
  param_axes = partitioning.logical_axes(abstract)
  p_specs = partitioning.param_specs(abstract_params, param_axes, mesh, rules)
  specs = {"step": PartitionSpec(), "params": p_specs}
  if tx is not None:
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    specs["opt_state"] = partitioning.opt_state_specs(tx, abstract_opt, abstract_params,
                                                      p_specs)

  def init_fn():
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(seed))))
    state = {"step": jnp.zeros((), jnp.int32), "params": params}
    if tx is not None:
      state["opt_state"] = tx.init(params)
    return state

  return Setup(cfg, mesh, rules, graphdef, init_fn, partitioning.to_named(specs, mesh), tx,
               schedule, param_axes)
