"""CLI: python -m ul2x.eval --gin_file=gin_configs/models/tiny.gin \
  --gin_file=gin_configs/runs/eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" ..."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("CHECKPOINT_PATH", "EVAL_OUTPUT_DIR", "MIXTURE_OR_TASK_NAME",
            "TASK_FEATURE_LENGTHS")


def main(argv: list[str]) -> None:
  args = gin_setup.parse_flags(argv, "Evaluate ul2x checkpoints with seqio metrics.")
  from ul2x import partitioning
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index)
  import seqio

  import ul2x.tasks  # noqa: F401  registers the default tasks
  from ul2x.trainer import evaluate
  if args.tfds_data_dir:
    seqio.set_tfds_data_dir_override(args.tfds_data_dir)
  gin_setup.load_config(args, REQUIRED)
  evaluate.evaluate()


if __name__ == "__main__":
  gin_setup.run_cli(main)
