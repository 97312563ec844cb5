"""A hook of one's own in the training loop, through the train command: lm-eval during
training (`train.hooks = [@LmEvalHook()]`) gives at the last step what the lm_eval job
gives on the checkpoint saved there."""

import json

from cli_utils import one_line_error, run_job
from test_lm_eval import offline, write_tasks  # noqa: F401  (offline: a module fixture)

TRAIN = ["--gin_file=gin_configs/models/decoder_only_tiny.gin",
         "--gin_file=gin_configs/runs/pretrain.gin", "--gin.MIXTURE_OR_TASK_NAME='ul2x_lm'",
         "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
         "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.train.log_every=1",
         "--gin.train.eval_every=0", "--gin.train.hooks=[@LmEvalHook()]"]


def test_lm_eval_during_training_equals_the_lm_eval_job(tmp_path):
  (tmp_path / "tasks").mkdir()
  tasks_dir = write_tasks(tmp_path / "tasks")
  hook = ["--gin.LmEvalHook.tasks=['lm_test_choice']", "--gin.LmEvalHook.every=2",
          f"--gin.LmEvalHook.include_path='{tasks_dir}'", "--gin.LmEvalHook.batch_size=8", "--gin.LmEvalHook.limit=6"]
  model_dir = tmp_path / "run"
  result = run_job("train", *TRAIN, f"--gin.MODEL_DIR='{model_dir}'", *hook)
  assert result.returncode == 0, result.stderr[-3000:]
  saved, = (model_dir / "lm_eval" / "step-2").glob("*/results_*.json")
  during = json.loads(saved.read_text())["results"]["lm_test_choice"]
  assert f"lm_eval step 2  lm_test_choice/acc {during['acc,none']:.4g}" in result.stdout
  assert list((model_dir / "lm_eval").glob("events.out.tfevents.*"))

  result = run_job("lm_eval", "--gin_file=gin_configs/runs/lm_eval.gin",
                   f"--gin.CHECKPOINT_PATH='{model_dir}'",
                   f"--gin.LM_EVAL_OUTPUT_DIR='{tmp_path / 'out'}'",
                   f"--gin.LM_EVAL_INCLUDE_PATH='{tasks_dir}'", "--gin.lm_eval.batch_size=8", "--gin.lm_eval.limit=6",
                   "--gin.LM_EVAL_TASKS=['lm_test_choice']")
  assert result.returncode == 0, result.stderr[-3000:]
  saved, = (tmp_path / "out").glob("*/results_*.json")
  after = json.loads(saved.read_text())["results"]["lm_test_choice"]
  assert [after[k] for k in ("acc,none", "acc_norm,none")] == [
      during[k] for k in ("acc,none", "acc_norm,none")]

  one_line_error(run_job("train", *TRAIN, f"--gin.MODEL_DIR='{tmp_path / 'bad'}'", *hook,
                         "--gin.LmEvalHook.tasks=['no_such_task']"), "no_such_task")
  assert not (tmp_path / "bad").exists()


def test_lm_eval_refuses_a_vocabulary_other_than_bytes(tmp_path):
  import dataclasses

  import pytest

  from ul2x.model import TransformerConfig
  from ul2x.trainer import lm_eval_model, record
  (tmp_path / record.RECORD).write_text(json.dumps(
      {"model": dataclasses.asdict(TransformerConfig()), "vocabulary": {"type": "hf",
                                                                        "dir": "hf_tokenizer"}}))
  with pytest.raises(ValueError, match="records a 'hf' vocabulary"):
    lm_eval_model.check_vocabulary(str(tmp_path))
  (tmp_path / record.RECORD).write_text(json.dumps(
      {"model": dataclasses.asdict(TransformerConfig()), "vocabulary": {"type": "byte"}}))
  lm_eval_model.check_vocabulary(str(tmp_path))
