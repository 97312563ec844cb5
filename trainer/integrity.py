"""Damaged checkpoints: a manifest of every finished checkpoint's files, their sizes and
CRC-32 checksums, and the check that names a missing, resized or altered file before
orbax reads it (orbax's own failure on a damaged checkpoint is hundreds of lines of
tracebacks from its reader threads, or no failure at all for altered bytes)."""

import json
import os
import zlib

import jax

MANIFEST = "ul2x_files.json"
CHUNK = 1 << 22


def _files(step_dir: str) -> dict[str, str]:
  """Relative name -> full path of every file of a step but its manifest."""
  paths = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      if not name.startswith(MANIFEST):
        path = os.path.join(root, name)
        paths[os.path.relpath(path, step_dir)] = path
  return paths


def checksum(path: str) -> int:
  """The CRC-32 of a file's bytes (zlib releases the GIL while it sums a chunk)."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifests(directory: str, steps) -> None:
  """Records the files of each finished checkpoint in `steps` that has no manifest yet
  (process 0 only; a manifest is written once, after orbax has committed the step).
  `Checkpointer` calls it on a thread of its own, off the training loop's. A step that
  orbax deletes meanwhile (keep-N) is passed over."""
  if jax.process_index() != 0:
    return
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    manifest = os.path.join(step_dir, MANIFEST)
    if not os.path.isdir(step_dir) or os.path.exists(manifest):
      continue
    try:
      record = {name: [os.path.getsize(path), checksum(path)]
                for name, path in _files(step_dir).items()}
      with open(manifest + ".tmp", "w") as f:
        json.dump(record, f)
      os.replace(manifest + ".tmp", manifest)
    except FileNotFoundError:  # deleted by keep-N while we read it
      continue


def checksummed(directory: str, step: int) -> bool:
  """True if checkpoint `step` has a manifest with checksums (and so `damage` read
  every byte of it)."""
  try:
    with open(os.path.join(directory, str(step), MANIFEST)) as f:
      return all(isinstance(v, list) for v in json.load(f).values())
  except (OSError, ValueError):
    return False


def damage(directory: str, step: int) -> str | None:
  """What is wrong with checkpoint `step` (a missing, resized or altered file, or an
  unreadable manifest), or None if its files are as saved or it has no manifest (a run
  stopped before writing it, or an older run; a manifest of sizes only, from older
  runs, checks sizes)."""
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
  for name, saved in sorted(expected.items()):
    size, crc = saved if isinstance(saved, list) else (saved, None)
    if name not in actual:
      return f"file {name} is missing"
    if os.path.getsize(actual[name]) != size:
      return f"file {name} has {os.path.getsize(actual[name])} bytes, not the {size} saved"
    if crc is not None and checksum(actual[name]) != crc:
      return f"file {name} does not match its checksum (its bytes changed since the save)"
  return None
