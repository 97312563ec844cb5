"""Orbax checkpoints of the train state plus the input pipeline's position and the
checkpoint's record, and the one restore path (any subset of the state, checked against
what is stored) every job uses."""

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from ul2x.partitioning.param_names import flat_names
from ul2x.trainer import integrity


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another model config: not damage, so never a reason to fall back."""


class DamagedCheckpointError(ValueError):
  """A checkpoint whose files are missing, truncated or unreadable."""


DATA_ITERATORS = "data_iterators"  # the item holding a DataStream's iterator states


class DataIteratorsHandler(ocp.CheckpointHandler):
  """Saves a `trainer.data.DataStream`'s tf.data iterator states as one item of the step,
  so orbax commits them with the state (in the step's temporary directory, renamed into
  place at once) and deletes them with it. Not an async handler on purpose: orbax runs
  it before `save` returns, while the loop has not yet read the next batch."""

  def save(self, directory, args: "DataIteratorsSave"):
    args.stream.save(os.fspath(directory))

  def restore(self, directory, args: "DataIteratorsRestore"):
    args.stream.restore(os.fspath(directory))
    return args.stream


@ocp.args.register_with_handler(DataIteratorsHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorsSave(ocp.args.CheckpointArgs):
  stream: Any


@ocp.args.register_with_handler(DataIteratorsHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorsRestore(ocp.args.CheckpointArgs):
  stream: Any


RECORD = "ul2x_model.json"  # MODEL_DIR's record of what the checkpoint is (trainer/record.py)
RECORD_ITEM = "record"  # the item holding a copy of it in each step


def record_files(model_dir: str) -> list[str]:
  """MODEL_DIR's record and the vocabulary file or directory it names ([] without a
  record): what `Checkpointer` copies into each step it saves."""
  path = os.path.join(model_dir, RECORD)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    vocab = json.load(f).get("vocabulary") or {}
  named = vocab.get("file") or vocab.get("dir")
  return [path] + ([os.path.join(model_dir, named)] if named else [])


class RecordHandler(ocp.CheckpointHandler):
  """Copies MODEL_DIR's record and its vocabulary files into the step (process 0), so a
  step's directory copied alone still describes itself; committed, checksummed by the
  manifest and deleted with the step."""

  def save(self, directory, args: "RecordSave"):
    if jax.process_index() != 0:
      return
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for path in args.files:
      target = os.path.join(directory, os.path.basename(path))
      if os.path.isdir(path):
        shutil.copytree(path, target)
      else:
        shutil.copy(path, target)

  def restore(self, directory, args: "RecordRestore"):
    return os.fspath(directory)  # trainer/record.py reads the files where they are


@ocp.args.register_with_handler(RecordHandler, for_save=True)
@dataclasses.dataclass
class RecordSave(ocp.args.CheckpointArgs):
  files: list


@ocp.args.register_with_handler(RecordHandler, for_restore=True)
@dataclasses.dataclass
class RecordRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Periodic, final and keep-N (optionally async) saves under `directory`.

  Each checkpoint holds the train state, as JSON the data position (`train_batches`
  read, `data_shards`, and the process count that wrote it), given a DataStream, its
  iterator states, so a resumed job continues with the next batch, and a copy of the
  record beside `directory` in MODEL_DIR, if there is one (`RECORD_ITEM`).
  """

  def __init__(self, directory: str, *, every: int, max_to_keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._manifests = concurrent.futures.ThreadPoolExecutor(1, "ul2x-manifests")
    self._pending = []

  def _record(self):
    """Writes the manifests of the finished checkpoints on the manifest thread."""
    self._pending.append(self._manifests.submit(
        integrity.write_manifests, self.directory, self.manager.all_steps()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int, final: bool = False) -> bool:
    return final or step % self.every == 0

  def maybe_save(self, step: int, state, data_position: dict, *, final: bool = False,
                 data_stream=None) -> bool:
    """Saves every `every` steps and at the final step; True if a save started."""
    if not self.due(step, final):
      return False
    self._record()
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(dict(data_position)))  # a copy: async saves
    if data_stream is not None:                                # serialize it later
      items[DATA_ITERATORS] = DataIteratorsSave(data_stream)
    files = record_files(os.path.dirname(self.directory))
    if files:
      items[RECORD_ITEM] = RecordSave(files)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self):
    """Waits for async saves, then for the manifests of every finished checkpoint."""
    self.manager.wait_until_finished()
    self._record()
    pending, self._pending = self._pending, []
    for future in pending:
      future.result()

  def close(self):
    try:
      self.wait()
    finally:
      self._manifests.shutdown()
      self.manager.close()


def checkpoint_steps(directory: str) -> list[int]:
  """The steps saved in a checkpoints directory, ascending ([] if none or no directory)."""
  if not os.path.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """-> (checkpoints directory, step) for `path`: a MODEL_DIR, its checkpoints/, or one
  step's directory (checkpoints/600). `step` None means the latest (or the one named)."""
  path = os.path.abspath(path)
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    directory, named = os.path.dirname(path), int(name)
    if step is not None and step != named:
      raise ValueError(f"checkpoint {path!r} is step {named}, not the requested step {step}.")
    return directory, named
  nested = os.path.join(path, "checkpoints")
  directory = nested if os.path.isdir(nested) else path
  steps = checkpoint_steps(directory)
  if not steps:
    raise ValueError(f"{path!r} holds no checkpoint; pass a MODEL_DIR of a train run, its "
                     "checkpoints/ directory or one step's directory (checkpoints/N).")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise ValueError(f"{directory!r} has no checkpoint at step {step}; it has steps {steps}.")
  return directory, step


def stored_params(directory: str, step: int) -> dict:
  """The parameters stored at `step` as a tree of ShapeDtypeStructs, keys as stored (read
  from orbax's metadata, no array bytes)."""
  path = epath.Path(directory) / str(step) / "state"
  tree = ocp.PyTreeCheckpointHandler().metadata(path).tree["params"]
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def stored_param_shapes(directory: str, step: int) -> dict[str, tuple]:
  """'encoder/...' -> shape of every parameter stored at `step`."""
  return {k: tuple(v.shape) for k, v in flat_names(stored_params(directory, step)).items()}


def check_compatible(directory: str, step: int, abstract) -> None:
  """Raises naming the first parameter of `abstract` (a state) missing from the
  checkpoint or stored with another shape (the usual cause: another model config)."""
  stored = stored_param_shapes(directory, step)
  for name, leaf in flat_names(abstract["params"]).items():
    if name not in stored:
      raise IncompatibleCheckpointError(
          f"checkpoint {directory}/{step} has no {name!r} (shape {tuple(leaf.shape)}): it was "
          "saved by another architecture or model config; use the gin model file it was "
          "trained with (MODEL_DIR/config.gin lists its TransformerConfig bindings), or an "
          "assignment map when fine-tuning.")
    if stored[name] != tuple(leaf.shape):
      raise IncompatibleCheckpointError(
          f"checkpoint {directory}/{step} stores {name!r} with shape {stored[name]}, but the "
          f"model expects {tuple(leaf.shape)}: the checkpoint comes from another model "
          "config (size or vocabulary); use the gin model file it was trained with "
          "(MODEL_DIR/config.gin lists its TransformerConfig bindings).")


def restore(directory: str, step: int, abstract, shardings, data_stream=None):
  """-> (the subset of the saved state that `abstract` describes (a pytree of
  ShapeDtypeStructs like the state, e.g. {'step', 'params'}), placed by `shardings`;
  the saved data position). A `data_stream` (trainer.data.DataStream) is moved to the
  saved position. Raises DamagedCheckpointError (one line naming the step and the file)
  for a damaged checkpoint: a file that differs from its manifest, or any failure to
  read a step whose bytes no checksum vouches for; IncompatibleCheckpointError for
  another model's or another data stream's."""
  directory = os.path.abspath(directory)  # orbax reads absolute paths only
  where = os.path.join(directory, str(step))
  problem = integrity.damage(directory, step)
  if problem:
    raise DamagedCheckpointError(f"checkpoint {where} is damaged: {problem}.")
  try:
    check_compatible(directory, step, abstract)
    return _read(directory, step, abstract, shardings, data_stream)
  except IncompatibleCheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise bare Exceptions for unreadable bytes
    _quiet_late_reads()
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    reason = f"{type(e).__name__}: {text[:300]}"
    if integrity.checksummed(directory, step):  # every byte is as saved: not damage
      raise ValueError(f"checkpoint {where} cannot be read although every file matches "
                       f"its checksum: {reason}") from None
    raise DamagedCheckpointError(f"checkpoint {where} cannot be read: {reason}") from None


def _ignore_closed_loop(unraisable, default=sys.unraisablehook):
  if not (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == "Event loop is closed"):
    default(unraisable)


def _quiet_late_reads() -> None:
  """After a failed restore, orbax's event loop is closed while tensorstore still
  finishes the other reads; their callbacks' 'Event loop is closed' errors (a traceback
  each, printed as unraisable) say nothing more, so they are dropped."""
  sys.unraisablehook = _ignore_closed_loop


def _read(directory: str, step: int, abstract, shardings, data_stream):
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  items = dict(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True), data=ocp.args.JsonRestore())
  saved_iterators = os.path.isdir(os.path.join(directory, str(step), DATA_ITERATORS))
  if data_stream is not None and saved_iterators:
    items[DATA_ITERATORS] = DataIteratorsRestore(data_stream)
  manager = ocp.CheckpointManager(directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()
  if data_stream is not None and not saved_iterators:
    data_stream.replay(restored["data"])
  return restored["state"], restored["data"]


def _checkpoint_name(name: str, assignment_map) -> str | None:
  """The stored name for the new model's parameter `name`; None keeps it as initialised."""
  for pattern, replacement in assignment_map:
    if re.fullmatch(pattern, name):
      return None if replacement is None else re.sub(pattern, replacement, name)
  return name


def restore_mapped_params(directory: str, step: int, params, shardings, assignment_map=()):
  """Fine-tuning's restore: each parameter of `params` (the new model's, initialised)
  is read from the checkpoint under the name the assignment map gives it: a list of
  (regex over 'encoder/layers/0/...' names, replacement or None); the first full match
  wins, None keeps the initialised value, no match keeps the name. Raises naming a
  parameter that is not stored (or has another shape). -> (params, names kept)."""
  stored = stored_param_shapes(directory, step)
  flat, flat_shardings = flat_names(params), flat_names(shardings)
  sources, kept = {}, []
  for name, leaf in flat.items():
    source = _checkpoint_name(name, assignment_map)
    if source is None:
      kept.append(name)
      continue
    where = "" if source == name else f" (mapped to {source!r})"
    if source not in stored:
      raise ValueError(
          f"fine-tuning: parameter {name!r}{where} of shape {tuple(leaf.shape)} is not in "
          f"checkpoint {directory}/{step}; add it to train.init_assignment_map, e.g. "
          f"[(r'{name}', None)] to keep it freshly initialised, or map it to a stored name.")
    if stored[source] != tuple(leaf.shape):
      raise ValueError(
          f"fine-tuning: parameter {name!r}{where} has shape {tuple(leaf.shape)} but the "
          f"checkpoint stores {stored[source]}; map it elsewhere or to None in "
          "train.init_assignment_map.")
    sources[name] = source
  abstract = {"params/" + s: jax.ShapeDtypeStruct(flat[n].shape, flat[n].dtype)
              for n, s in sources.items()}
  shard = {"params/" + s: flat_shardings[n] for n, s in sources.items()}
  restored, _ = restore(directory, step, traverse_util.unflatten_dict(abstract, sep="/"),
                        traverse_util.unflatten_dict(shard, sep="/"))
  restored = flat_names(restored)
  leaves = [restored["params/" + sources[n]] if n in sources else leaf for n, leaf in flat.items()]
  return jax.tree.unflatten(jax.tree.structure(params), leaves), kept
