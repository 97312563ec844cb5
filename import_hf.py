"""CLI: python -m ul2x.import_hf --hf_dir=DIR --model_dir=OUT [--overwrite]

Reads a local Hugging Face transformers directory (T5 v1.1 / UL2 or Llama) into a ul2x
MODEL_DIR: checkpoints/0 and model.gin (docs/export.md)."""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      description="Import a Hugging Face T5 or Llama directory into a ul2x MODEL_DIR.")
  parser.add_argument("--hf_dir", required=True, help="directory from save_pretrained")
  parser.add_argument("--model_dir", required=True, help="ul2x MODEL_DIR to create")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty MODEL_DIR")
  args = parser.parse_args(argv)
  from ul2x.export.importer import import_hf
  import_hf(args.hf_dir, args.model_dir, overwrite=args.overwrite)


if __name__ == "__main__":
  gin_setup.run_cli(main)
