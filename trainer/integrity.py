"""Damaged checkpoints: a manifest of every finished checkpoint's files and sizes, and the
check that names a missing or truncated file before orbax reads it (orbax's own failure
on a damaged checkpoint is hundreds of lines of tracebacks from its reader threads)."""

import json
import os

import jax

MANIFEST = "ul2x_files.json"


def _files(step_dir: str) -> dict[str, int]:
  sizes = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      if not name.startswith(MANIFEST):
        sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
  return sizes


def write_manifests(directory: str, steps) -> None:
  """Records the files of each finished checkpoint in `steps` that has no manifest yet
  (process 0 only; a manifest is written once, after orbax has committed the step)."""
  if jax.process_index() != 0:
    return
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    manifest = os.path.join(step_dir, MANIFEST)
    if os.path.isdir(step_dir) and not os.path.exists(manifest):
      sizes = _files(step_dir)
      with open(manifest + ".tmp", "w") as f:
        json.dump(sizes, f)
      os.replace(manifest + ".tmp", manifest)


def damage(directory: str, step: int) -> str | None:
  """What is wrong with checkpoint `step` (a missing or resized file, or an unreadable
  manifest), or None if its files are as saved or it has no manifest (older runs)."""
  step_dir = os.path.join(directory, str(step))
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(manifest):
    return None
  try:
    with open(manifest) as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    return f"its file manifest {manifest} is unreadable ({e})"
  actual = _files(step_dir)
  for name, size in sorted(expected.items()):
    if name not in actual:
      return f"file {name} is missing"
    if actual[name] != size:
      return f"file {name} has {actual[name]} bytes, not the {size} saved"
  return None
