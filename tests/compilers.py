"""Where `make libtpu` and `make cuda_plugin` put the accelerator compilers for this venv's
jax: `.libtpu/` and `.cuda_plugin/` for `.venv`, inside the venv for another (the Makefile
passes UL2X_LIBTPU_DIR and UL2X_CUDA_PLUGIN_DIR)."""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compiler_folder(target: str) -> pathlib.Path:
  """target: 'libtpu' or 'cuda_plugin', as the make target that installs it."""
  return ROOT / os.environ.get(f"UL2X_{target.upper()}_DIR", f".{target}")


def missing(target: str) -> str | None:
  """Why the compiler is not there (a reason to skip), or None where it is."""
  folder = compiler_folder(target)
  if (folder / ".installed").is_file():
    return None
  if (folder / "unavailable").is_file():  # the make target found no wheel for this jax
    return f"needs {folder.name}: {(folder / 'unavailable').read_text().strip()}"
  return f"needs {folder.name} (`make {target}`; `make test` installs it)"
