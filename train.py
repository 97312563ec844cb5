"""CLI: python -m ul2x.train --gin_file=gin_configs/runs/pretrain.gin --gin.MODEL_DIR="'/tmp/run'"."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("MODEL_DIR", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS")


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Train a ul2x model.", REQUIRED, "ul2x.trainer.loop")
  from ul2x.trainer import loop
  loop.train()  # writes MODEL_DIR/config.gin once the config and the data check out


if __name__ == "__main__":
  gin_setup.run_cli(main)
