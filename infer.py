"""CLI: python -m ul2x.infer --gin_file=gin_configs/runs/infer.gin \
  --gin.CHECKPOINT_PATH="'runs/quickstart'" ..."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

REQUIRED = ("CHECKPOINT_PATH", "INFER_OUTPUT_DIR")


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Decode or score with a ul2x checkpoint.", REQUIRED,
                      "ul2x.trainer.infer")
  from ul2x.trainer import infer
  infer.infer()


if __name__ == "__main__":
  gin_setup.run_cli(main)
