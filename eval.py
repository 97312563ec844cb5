"""CLI: python -m ul2x.eval --gin_file=gin_configs/runs/eval.gin \
  --gin.CHECKPOINT_PATH="'/tmp/run'" ..."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("CHECKPOINT_PATH", "EVAL_OUTPUT_DIR")


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Evaluate ul2x checkpoints with seqio metrics.", REQUIRED,
                      "ul2x.trainer.evaluate")
  from ul2x.trainer import evaluate
  evaluate.evaluate()


if __name__ == "__main__":
  gin_setup.run_cli(main)
