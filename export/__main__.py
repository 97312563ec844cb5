"""CLI: python -m ul2x.export --gin_file=gin_configs/runs/export.gin \
  --gin.CHECKPOINT_PATH="'runs/quickstart'" --gin.EXPORT_DIR="'/tmp/quickstart-hf'"

(The entry point lives here, not in a root export.py: the `export/` package would
shadow a module of that name.)"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402


def main(argv: list[str]) -> None:
  gin_setup.start_job(argv, "Export a ul2x checkpoint to Hugging Face or safetensors.",
                      "ul2x.export.job", tasks=False)
  from ul2x.export import job
  job.export()


if __name__ == "__main__":
  gin_setup.run_cli(main)
