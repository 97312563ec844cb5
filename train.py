"""CLI: python -m ul2x.train --gin_file=gin_configs/runs/pretrain.gin --gin.MODEL_DIR="'/tmp/run'"."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("MODEL_DIR", "TRAIN_STEPS", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS")


def main(argv: list[str]) -> None:
  args = gin_setup.parse_flags(argv, "Train a ul2x model.")
  from ul2x import partitioning
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index)
  import gin
  import jax
  import seqio

  import ul2x.tasks  # noqa: F401  registers the default tasks
  from ul2x.trainer import loop
  if args.tfds_data_dir:
    seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  gin_setup.load_config(args, REQUIRED)
  model_dir = gin.query_parameter("%MODEL_DIR")
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  loop.train()


if __name__ == "__main__":
  gin_setup.run_cli(main)
