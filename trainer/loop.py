"""The training job: mesh, sharded state, data, jitted steps, evaluation, checkpoints."""

import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from ul2x import partitioning
from ul2x.model import TransformerConfig
from ul2x.model.flops import tokens_per_example, training_flops_per_example
from ul2x.model.moe import upcycle_dense_params
from ul2x.tasks import pipeline
from ul2x.trainer.checkpoints import Checkpointer
from ul2x.trainer.metrics import MetricsWriter, Progress, peak_flops_per_device
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.steps import init_train_state, make_eval_step, make_train_step, summarize


def _global_batch(local: dict, shardings: dict) -> dict:
  """This host's numpy batch -> global jax arrays laid out by `shardings`."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}


def _say(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _dense_params(path: str) -> dict:
  """Params of the latest checkpoint under `path`: a MODEL_DIR or its checkpoints/."""
  directory = os.path.join(path, "checkpoints")
  directory = os.path.abspath(directory if os.path.isdir(directory) else path)
  manager = ocp.CheckpointManager(directory) if os.path.isdir(directory) else None
  step = manager and manager.latest_step()
  if step is None:
    raise ValueError(f"train.init_from_dense_checkpoint={path!r} holds no checkpoint; pass "
                     "the MODEL_DIR of a dense run (or its checkpoints/ directory).")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  _say(f"upcycling the dense checkpoint {directory} at step {step}")
  return jax.device_get(restored["state"]["params"])  # host arrays: placed by the caller's jit


def _check_batch_size(batch_size: int, num_microbatches: int, mesh, rules):
  spec = partitioning.batch_spec(rules, mesh)
  axes = partitioning.mesh_axes(spec[0] if len(spec) else None)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  need = np.lcm(shards * num_microbatches, jax.process_count())
  if batch_size % need:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by {need} (batch shards {shards} x "
        f"num_microbatches {num_microbatches}, and {jax.process_count()} hosts); change "
        "--gin.train.batch_size, --gin.train.num_microbatches or the mesh.")


@gin.configurable
def train(*, model_dir: str, train_steps: int, mixture_or_task_name: str,
          task_feature_lengths: dict, model_config: TransformerConfig = gin.REQUIRED,
          batch_size: int = 16, num_microbatches: int = 1, z_loss: float = 1e-4,
          seed: int = 0, pack: bool = True, log_every: int = 10, eval_every: int = 100,
          eval_batches: int = 4, eval_split: str = "validation",
          checkpoint_every: int = 500, keep_checkpoints: int = 3,
          async_checkpointing: bool = True, logical_axis_rules=None,
          moe_aux_loss: float = 1e-2, router_z_loss: float = 1e-3,
          init_from_dense_checkpoint: str | None = None) -> dict:
  """Trains until `train_steps`, resuming from the latest checkpoint in `model_dir`.

  A fresh MoE run with `init_from_dense_checkpoint` (a dense run's MODEL_DIR)
  starts from that checkpoint's params, each MLP copied into every expert.

  Returns the last logged metrics (a dict of floats).
  """
  for name, value, least in (("log_every", log_every, 1), ("checkpoint_every", checkpoint_every, 1),
                             ("eval_every", eval_every, 0), ("train_steps", train_steps, 1)):
    if value < least:
      raise ValueError(f"train.{name}={value} must be at least {least}.")
  cfg = model_config
  mesh = partitioning.create_mesh()
  rules = logical_axis_rules or partitioning.standard_logical_axis_rules()
  _check_batch_size(batch_size, num_microbatches, mesh, rules)
  tx, schedule = create_optimizer(train_steps)
  graphdef, init_fn, state_shardings = init_train_state(cfg, tx, mesh, rules, seed)

  ckpt = Checkpointer(os.path.join(model_dir, "checkpoints"),
                      every=checkpoint_every, max_to_keep=keep_checkpoints,
                      async_save=async_checkpointing)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    data_position = {"train_batches": 0}
    if init_from_dense_checkpoint:
      upcycle = jax.jit(lambda dense, moe: upcycle_dense_params(dense, moe, cfg),
                        out_shardings=state_shardings["params"])
      state["params"] = upcycle(_dense_params(init_from_dense_checkpoint), state["params"])
  else:
    state, data_position = ckpt.restore(latest, jax.eval_shape(init_fn), state_shardings)
    _say(f"resumed from {ckpt.directory} at step {latest}")
  start = int(state["step"])
  if start >= train_steps:
    _say(f"already trained to step {start} (train_steps={train_steps}) in {model_dir}; "
         "raise TRAIN_STEPS or use a new MODEL_DIR to train more.")
    ckpt.close()
    return {}

  hosts = dict(shard_index=jax.process_index(), num_shards=jax.process_count())
  local_batch = batch_size // jax.process_count()
  train_ds = pipeline.get_dataset(
      mixture_or_task_name, task_feature_lengths, "train", local_batch,
      architecture=cfg.architecture, pack=pack, seed=seed, **hosts)
  train_iter = train_ds.skip(data_position["train_batches"]).as_numpy_iterator()
  batch_spec = partitioning.batch_spec(rules, mesh)
  batch_shardings = {k: jax.sharding.NamedSharding(mesh, batch_spec)
                     for k in train_ds.element_spec}

  step_fn = jax.jit(
      make_train_step(graphdef, tx, schedule, mesh=mesh, rules=rules,
                      num_microbatches=num_microbatches, z_loss=z_loss,
                      moe_aux_loss=moe_aux_loss, router_z_loss=router_z_loss,
                      dropout_seed=seed),
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, None), donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(graphdef, mesh=mesh, rules=rules, z_loss=z_loss),
                    in_shardings=(state_shardings["params"], batch_shardings))
  eval_data = []
  if eval_every and eval_batches:
    eval_ds = pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, eval_split, local_batch,
        architecture=cfg.architecture, pack=pack, seed=seed, **hosts)
    eval_data = [_global_batch(b, batch_shardings)
                 for b in eval_ds.take(eval_batches).as_numpy_iterator()]

  lengths = pipeline.feature_lengths_for(cfg.architecture, task_feature_lengths)
  progress = Progress(train_steps, batch_size * tokens_per_example(cfg, lengths),
                      batch_size * training_flops_per_example(cfg, lengths),
                      peak_flops_per_device())
  train_writer = MetricsWriter(os.path.join(model_dir, "train"))
  eval_writer = MetricsWriter(os.path.join(model_dir, "eval"))
  scalars = {}
  progress.mark(start)
  for step in range(start + 1, train_steps + 1):
    state, metrics = step_fn(state, _global_batch(next(train_iter), batch_shardings))
    data_position["train_batches"] += 1
    if step % log_every == 0 or step == train_steps:
      metrics = jax.device_get(metrics)
      scalars = progress.report(step, metrics)
      train_writer.write(step, {**metrics, **scalars})
    if eval_data and (step % eval_every == 0 or step == train_steps):
      sums = [jax.device_get(eval_fn(state["params"], b)) for b in eval_data]
      totals = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
      eval_scalars = {k: float(v) for k, v in summarize(totals).items()}
      eval_writer.write(step, eval_scalars)
      _say(f"eval step {step}  loss {eval_scalars['loss']:.4f}  "
           f"acc {eval_scalars['accuracy']:.3f}")
      progress.mark(step)
    ckpt.maybe_save(step, state, data_position, final=step == train_steps)
  ckpt.close()
  _say(f"checkpoints: {ckpt.directory}\ntensorboard: {os.path.abspath(model_dir)} "
       f"(tensorboard --logdir {os.path.abspath(model_dir)})")
  return scalars
