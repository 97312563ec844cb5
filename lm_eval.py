"""CLI: python -m ul2x.lm_eval --gin_file=gin_configs/models/tiny.gin \
  --gin_file=gin_configs/runs/lm_eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" ..."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("CHECKPOINT_PATH", "LM_EVAL_OUTPUT_DIR", "LM_EVAL_TASKS")


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Evaluate a ul2x checkpoint on lm-eval tasks.", REQUIRED,
                      "ul2x.trainer.lm_eval_model")
  from ul2x.trainer import lm_eval_model
  lm_eval_model.run_lm_eval()


if __name__ == "__main__":
  gin_setup.run_cli(main)
