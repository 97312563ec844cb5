"""MoE in training: router losses in the objective, microbatching, learning, and the train
job (upcycling from a dense checkpoint, expert parallelism, logged router metrics)."""

import dataclasses
import glob

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

import ul2x.tasks  # noqa: F401  registers the default tasks
from ul2x import partitioning
from ul2x.model import TransformerConfig, build_model
from ul2x.trainer import loop, upcycling
from ul2x.trainer.checkpoints import Checkpointer, DamagedCheckpointError
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup
from train_utils import TINY, copy_batch

MOE = dataclasses.replace(TINY, num_encoder_layers=1, num_decoder_layers=1,
                          moe_layer_interval=1, num_experts=4, expert_mlp_dim=32, group_size=16)
STEPS = 300
RULES = partitioning.standard_logical_axis_rules()


def test_moe_learns_router_losses_join_the_objective_and_microbatching_changes_nothing():
  """One initial state, trained 300 steps on the copy task, and 2 steps microbatched."""
  mesh = partitioning.create_mesh(data=2, devices=jax.devices()[:2])
  job = setup(MOE, mesh=mesh, rules=RULES, optimizer=create_optimizer(STEPS, name="adamw"))
  initial = job.init_state()
  sharding = job.batch_sharding
  step = job.train_step(donate=False)
  state, history = initial, []
  for i in range(STEPS):
    state, metrics = step(state, jax.device_put(copy_batch(i % 16), sharding))
    history.append(metrics)
    if i == 1:
      params = jax.device_get(state["params"])
  history = jax.device_get(history)
  losses = [float(m["cross_entropy"]) for m in history]
  start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
  assert end < 0.25 * start, (start, end)

  for m in history[:2]:  # loss = cross-entropy + z-loss + 1e-2 aux + 1e-3 router z (defaults)
    np.testing.assert_allclose(
        m["loss"], m["cross_entropy"] + m["z_loss"] + 1e-2 * m["moe/aux_loss"]
        + 1e-3 * m["moe/router_z_loss"], rtol=1e-6)
    assert m["moe/aux_loss"] > 0.5 and m["moe/router_z_loss"] > 0
    assert m["moe/encoder/tokens_per_expert"].shape == (4,)
  micro_step = job.train_step(num_microbatches=2, donate=False)
  state = initial
  for i in range(2):
    state, metrics = micro_step(state, jax.device_put(copy_batch(i), sharding))
    for key in ("loss", "moe/aux_loss", "moe/router_z_loss", "moe/decoder/dropped_fraction"):
      np.testing.assert_allclose(history[i][key], metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, jax.device_get(state["params"]))


@pytest.fixture
def expert_mesh():
  with gin.unlock_config():
    gin.bind_parameter("create_mesh.expert", 4)
  yield
  gin.clear_config()


def _tags(directory):
  tags = set()
  for path in glob.glob(f"{directory}/events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def _save_dense_checkpoint(cfg, directory):
  """A checkpoint like the train job's, of freshly initialised dense params."""
  params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(1))))
  ckpt = Checkpointer(directory, every=1, max_to_keep=1, async_save=False)
  ckpt.maybe_save(1, {"step": np.int32(1), "params": params}, {"train_batches": 0}, final=True)
  ckpt.close()


def test_train_job_upcycles_a_dense_checkpoint_and_logs_router_metrics(tmp_path, capsys,
                                                                        expert_mesh):
  dense = TransformerConfig(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                            num_encoder_layers=1, num_decoder_layers=1)
  moe = dataclasses.replace(dense, num_experts=4, moe_layer_interval=1, group_size=16)
  _save_dense_checkpoint(dense, str(tmp_path / "dense" / "checkpoints"))
  args = dict(mixture_or_task_name="ul2x_span_corruption", batch_size=8, model_config=moe,
              task_feature_lengths={"inputs": 32, "targets": 16}, log_every=1, eval_every=0,
              async_checkpointing=False)
  with pytest.raises(ValueError, match="init_from_dense_checkpoint=.* holds no checkpoint"):
    upcycling._dense_params(str(tmp_path / "nowhere"))
  metrics = loop.train(model_dir=str(tmp_path / "moe"), train_steps=2,
                          init_from_dense_checkpoint=str(tmp_path / "dense"), **args)
  out = capsys.readouterr().out
  assert f"upcycling the dense checkpoint {tmp_path}/dense/checkpoints at step 1" in out
  assert "moe aux" in out and "unrouted" in out
  for key in ("moe/aux_loss", "moe/encoder/unrouted_fraction", "moe/decoder/dropped_fraction",
              "moe/encoder/router_entropy", "moe/decoder/experts_per_token/2"):
    assert np.isfinite(metrics[key]), key
  tags = _tags(tmp_path / "moe" / "train")
  assert {"moe/encoder/tokens_per_expert", "moe/router_z_loss", "loss"} <= tags


def test_a_damaged_dense_checkpoint_is_refused_in_one_line(tmp_path):
  """Upcycling restores through checkpoints.restore: its manifest check names the file."""
  directory = tmp_path / "dense" / "checkpoints"
  _save_dense_checkpoint(TransformerConfig(emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                                           num_encoder_layers=1, num_decoder_layers=1),
                         str(directory))
  files = [p for p in (directory / "1").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(100)
  name = largest.relative_to(directory / "1")
  with pytest.raises(DamagedCheckpointError, match=rf"^checkpoint {directory}/1 is damaged: file "
                                                   rf"{name} has 100 bytes, not the \d+ saved\.$"):
    upcycling._dense_params(str(tmp_path / "dense"))
