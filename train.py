"""CLI: python -m ul2x.train --gin_file=gin_configs/runs/pretrain.gin --gin.MODEL_DIR="'/tmp/run'"."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("MODEL_DIR", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS")


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Train a ul2x model.", REQUIRED, "ul2x.trainer.loop")
  import gin
  import jax

  from ul2x.trainer import loop
  model_dir = gin.query_parameter("%MODEL_DIR")
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  loop.train()


if __name__ == "__main__":
  gin_setup.run_cli(main)
