"""The training job: checkpoints, exact resume (state and data position), keep-N."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ul2x.tasks  # noqa: F401  registers the default tasks
from ul2x.trainer.loop import train
from ul2x.model import TransformerConfig

CFG = TransformerConfig(emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                        num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)


def run(model_dir, steps, **kw):
  args = dict(model_dir=str(model_dir), train_steps=steps,
              mixture_or_task_name="ul2x_span_corruption",
              task_feature_lengths={"inputs": 32, "targets": 16}, model_config=CFG,
              batch_size=8, log_every=2, eval_every=3, eval_batches=1, checkpoint_every=3,
              keep_checkpoints=2)
  return train(**{**args, **kw})


def saved(model_dir, step):
  manager = ocp.CheckpointManager(os.path.join(model_dir, "checkpoints"))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return jax.device_get(restored["state"]), restored["data"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("straight")
  metrics = run(model_dir, 8)
  return model_dir, metrics


def test_resume_continues_exactly(uninterrupted, tmp_path, capsys):
  straight_dir, straight_metrics = uninterrupted
  run(tmp_path, 4)
  resumed_metrics = run(tmp_path, 8)
  assert "resumed from" in capsys.readouterr().out
  (a, data_a), (b, data_b) = saved(straight_dir, 8), saved(tmp_path, 8)
  assert data_a == data_b == {"train_batches": 8}
  assert int(a["step"]) == int(b["step"]) == 8
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
  assert resumed_metrics["loss"] == straight_metrics["loss"]


def test_outputs_and_keep_n(uninterrupted):
  model_dir, metrics = uninterrupted
  steps = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints"))
                 if d.isdigit())
  assert steps == [6, 8]  # saved at 3, 6 and the final 8; keep 2
  for sub in ("train", "eval"):
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(model_dir, sub)))
  for key in ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
    assert np.isfinite(metrics[key]), key


def test_finished_job_does_nothing(uninterrupted, capsys):
  model_dir, _ = uninterrupted
  assert run(model_dir, 8) == {}
  assert "already trained to step 8" in capsys.readouterr().out
