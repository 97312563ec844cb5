"""The files an export or import reads and writes: safetensors (sharded, with the
Hugging Face index), JSON, and output directories staged next to their final place.

The safetensors format (8-byte little-endian header length, a JSON header of
name -> dtype, shape, byte offsets, then the raw little-endian tensor bytes) is
written here directly, so that tensors go to disk one at a time as they leave the
device and exporting needs no torch or safetensors package.
"""

import contextlib
import json
import os
import re
import shutil
import struct
import uuid

import jax
import jax.numpy as jnp
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_CODES = {"F32": np.dtype(np.float32), "BF16": jnp.dtype(jnp.bfloat16),
          "F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}
_NAMES = {dtype: code for code, dtype in _CODES.items()}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
  """'2GB' (powers of 10), '500MiB' (powers of 2) or an int of bytes -> bytes."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if isinstance(size, bool) or not match or float(match[1]) <= 0:
    raise ValueError(f"export.max_shard_size={size!r} is not a size; give bytes (500000000) "
                     "or a string such as '2GB' or '500MiB'.")
  return int(float(match[1]) * _UNITS[(match[2] or "B").upper()])


def write_sharded(directory: str, tensors: dict, max_shard_size: int, metadata: dict) -> int:
  """Writes `tensors` {name: () -> array} into `directory` as `model.safetensors`, or
  past `max_shard_size` bytes as `model-0000k-of-0000n.safetensors` files plus the
  `model.safetensors.index.json` Hugging Face reads. Each array is computed and moved
  to the host only when its bytes are written. -> total bytes of tensor data."""
  specs = {name: jax.eval_shape(get) for name, get in tensors.items()}
  sizes = {name: spec.size * spec.dtype.itemsize for name, spec in specs.items()}
  shards, used = [[]], 0
  for name, size in sizes.items():
    if shards[-1] and used + size > max_shard_size:  # a tensor past the limit sits alone
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  n = len(shards)
  files = [SINGLE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in
                                   range(1, n + 1)]
  for file, names in zip(files, shards):
    _write_safetensors(os.path.join(directory, file), {k: tensors[k] for k in names},
                       {k: specs[k] for k in names}, metadata)
  total = sum(sizes.values())
  if n > 1:
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    write_json(os.path.join(directory, INDEX),
               {"metadata": {"total_size": total}, "weight_map": weight_map})
  return total


def _write_safetensors(path: str, tensors: dict, specs: dict, metadata: dict) -> None:
  header, offset = {"__metadata__": metadata}, 0
  for name, spec in specs.items():
    size = spec.size * spec.dtype.itemsize
    header[name] = {"dtype": _NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name, get in tensors.items():
      f.write(np.ascontiguousarray(jax.device_get(get())).tobytes())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """-> {name: float32 array} of one .safetensors file (F32, BF16, F16 or F64)."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  data = np.memmap(path, np.uint8, mode="r", offset=8 + length)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _CODES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; ul2x reads "
                       f"{', '.join(_CODES)}; re-save the model in float32.")
    start, end = info["data_offsets"]
    array = data[start:end].view(_CODES[info["dtype"]]).reshape(info["shape"])
    out[name] = array.astype(np.float32)
  return out


def read_directory(directory: str) -> dict[str, np.ndarray]:
  """-> {name: float32 array} of a `save_pretrained` directory, sharded or not."""
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    names = sorted(set(read_json(index)["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, SINGLE)):
    names = [SINGLE]
  else:
    raise ValueError(f"{directory} has neither {SINGLE} nor {INDEX} (a pytorch_model.bin "
                     "is not read); save the model with save_pretrained(dir) in transformers "
                     ">= 4.35, which writes safetensors.")
  tensors = {}
  for name in names:
    tensors.update(read_safetensors(os.path.join(directory, name)))
  return tensors


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write("\n")


def check_target(directory: str, overwrite: bool, flag: str, overwrite_flag: str) -> None:
  """Raises if `directory` is a file, or exists and is not empty while `overwrite` is off;
  the message names the `flag` that sets it and the `overwrite_flag`."""
  if os.path.isfile(directory):
    raise ValueError(f"{directory} is a file; pass {flag} a directory path.")
  if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
    raise ValueError(f"{directory} exists and is not empty; pass {flag} a new directory, "
                     f"or {overwrite_flag} to replace it.")


@contextlib.contextmanager
def staged_directory(directory: str, overwrite: bool, flag: str, overwrite_flag: str):
  """Yields a fresh directory beside `directory`, renamed to it when the block ends
  without an error (replacing it if `overwrite`) and removed when it raises, so a
  failed job leaves nothing partial behind."""
  check_target(directory, overwrite, flag, overwrite_flag)
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  staging = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
  try:
    os.makedirs(parent, exist_ok=True)
    os.mkdir(staging)
  except OSError as e:
    raise ValueError(f"cannot create {staging} ({e.strerror}); choose a {flag} whose parent "
                     "is a writable directory.") from None
  try:
    yield staging
    _replace(staging, directory)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)


def _replace(staging: str, directory: str) -> None:
  """Renames `staging` to `directory`, moving an old non-empty one aside first."""
  old = None
  if os.path.isdir(directory) and os.listdir(directory):
    old = f"{staging}-old"
    os.rename(directory, old)
  os.replace(staging, directory)  # replaces an empty directory in one step
  if old:
    shutil.rmtree(old)
