"""The trainer's input stream: global batches that are a function of the seed and the step,
not of the host count; this process's rows of each; their position saved as tf.data
iterator state, so resuming at step 1,000,000 costs what resuming at step 10 does."""

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ul2x.tasks import pipeline  # first: hides GPUs from TensorFlow
import tensorflow as tf  # noqa: E402  (after the GPU is hidden)

from ul2x.trainer.checkpoints import IncompatibleCheckpointError  # noqa: E402


# What tf.data raises for a pipeline it cannot save: an op with external state
# (FailedPrecondition; InvalidArgument in TF 1.x) or a dataset without checkpoint
# support, e.g. prefetch_to_device (Unimplemented). `save` and `check_saveable` catch
# these and only these: an error writing the files is not the pipeline's fault.
_UNSAVEABLE_ERRORS = (tf.errors.FailedPreconditionError, tf.errors.InvalidArgumentError,
                      tf.errors.UnimplementedError)


def _tf_reason(error: tf.errors.OpError) -> str:
  """tf.data's reason without the op wrapping around it, the same from the graph check
  and from a save: 'EagerPyFunc is stateful.'"""
  return pipeline.tf_reason(error).removeprefix("Failed to serialize the input pipeline graph: ")


def process_rows(sharding: NamedSharding, batch_size: int) -> dict[int, list[int]]:
  """Process index -> the global batch rows its devices hold under `sharding` (a batch
  sharding over [batch, ...]), ascending: the order `make_array_from_process_local_data`
  expects a process's rows in."""
  rows_spec = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))
  rows: dict[int, set[int]] = {}
  for device, index in rows_spec.devices_indices_map((batch_size,)).items():
    rows.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
  return {p: sorted(r) for p, r in rows.items()}


def check_data_shards(data_shards, batch_size: int) -> None:
  if not isinstance(data_shards, int) or data_shards < 1 or batch_size % data_shards:
    raise ValueError(
        f"train.data_shards={data_shards!r} must be a positive integer dividing "
        f"batch_size={batch_size}; set --gin.train.data_shards to 1 or to the number of "
        "hosts (docs/data.md, Host sharding).")


class DataStream:
  """This process's rows of the global batches of `split`, as numpy feature dicts
  `{name: int32 [rows, length]}` (`next(stream)`).

  The global batch of `batch_size` rows is the concatenation of `data_shards` seqio
  streams: shard `k` is `get_dataset(..., shard_index=k, num_shards=data_shards)` with
  `batch_size / data_shards` rows and gives rows `k * batch_size / data_shards ...`. A
  process builds only the shards that hold its rows (every one when `data_shards` is 1,
  one of 4 with 4 shards on 4 hosts), so the batches depend on the seed, the step and
  `data_shards`, and never on how many processes read them.

  `save(directory)` writes each shard's tf.data iterator state (one process per shard
  writes it); `restore(directory)` reads the states of this process's shards, so any
  host count resumes a stream written by any other.
  """

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: dict, split: str, *,
               batch_size: int, data_shards: int, sharding: NamedSharding,
               architecture: str, pack: bool, seed: int):
    check_data_shards(data_shards, batch_size)
    self.data_shards = data_shards
    self._name = mixture_or_task_name
    rows_per_shard = batch_size // data_shards
    rows = process_rows(sharding, batch_size)
    mine = rows[jax.process_index()]
    self._shards = sorted({r // rows_per_shard for r in mine})
    first_reader = {}
    for process in sorted(rows):
      for r in rows[process]:
        first_reader.setdefault(r // rows_per_shard, process)
    self._writes = [k for k in self._shards if first_reader[k] == jax.process_index()]
    slot = {k: i for i, k in enumerate(self._shards)}
    take = np.array([slot[r // rows_per_shard] * rows_per_shard + r % rows_per_shard
                     for r in mine])
    whole = np.arange(len(self._shards) * rows_per_shard)
    self._take = None if np.array_equal(take, whole) else take  # None: all rows, in order
    self._datasets = {k: pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, split, rows_per_shard,
        architecture=architecture, pack=pack, seed=seed, shard_index=k,
        num_shards=data_shards) for k in self._shards}
    self._iterators = {}  # made on first use: a dataset's second pass reshuffles

  def _iterator(self, shard: int):
    if shard not in self._iterators:
      self._iterators[shard] = iter(self._datasets[shard])
    return self._iterators[shard]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._iterator(k)) for k in self._shards]
    batch = {name: np.concatenate([p[name].numpy() for p in parts]) if len(parts) > 1
             else parts[0][name].numpy() for name in parts[0]}
    if self._take is not None:
      batch = {name: rows[self._take] for name, rows in batch.items()}
    return batch

  def _prefix(self, directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}-of-{self.data_shards:05d}")

  def save(self, directory: str) -> None:
    """Writes the iterator state of the shards this process is the first reader of:
    `shard-KKKKK-of-NNNNN.{index,data-00000-of-00001}` (tf.train.Checkpoint files)."""
    for k in self._writes:
      try:
        tf.train.Checkpoint(iterator=self._iterator(k)).write(self._prefix(directory, k))
      except _UNSAVEABLE_ERRORS as e:
        raise self._unsaveable(e) from None

  def check_saveable(self) -> None:
    """Raises `save`'s error now if a pipeline holds an op whose state tf.data cannot
    save (a py_function). Saving a fresh iterator would not show it: a shuffle makes its
    input's iterator only on first use."""
    for k in self._writes:
      try:  # 2: fail on external state, as iterator checkpoints do
        tf.raw_ops.DatasetToGraphV2(input_dataset=self._datasets[k]._variant_tensor,
                                    external_state_policy=2)
      except _UNSAVEABLE_ERRORS as e:
        raise self._unsaveable(e) from None

  def _unsaveable(self, error) -> ValueError:
    return ValueError(
        f"the input pipeline of {self._name!r} cannot be checkpointed "
        f"({_tf_reason(error)}): every dataset op must be one tf.data can save (no "
        "py_function, no prefetch_to_device); see docs/data.md#resume-the-inputs-position-"
        "is-in-the-checkpoint.")

  def restore(self, directory: str) -> None:
    """Continues each of this process's shards where `save` left it. Raises
    IncompatibleCheckpointError if the states are of another `data_shards`, ValueError
    if a state file is missing or unreadable."""
    names = os.listdir(directory)
    if not any(f"-of-{self.data_shards:05d}." in name for name in names):
      stored = sorted({name.split("-of-")[1].split(".")[0].lstrip("0") for name in names
                       if "-of-" in name})
      raise IncompatibleCheckpointError(
          f"the data stream in {directory} has data_shards={', '.join(stored) or '?'}, "
          f"this job {self.data_shards}; resume with --gin.train.data_shards="
          f"{stored[0] if stored else 'N'} (the stream is defined by it), or start a new "
          "MODEL_DIR.")
    for k in self._shards:
      prefix = self._prefix(directory, k)
      try:
        tf.train.Checkpoint(iterator=self._iterator(k)).read(prefix).assert_consumed()
      except (tf.errors.OpError, AssertionError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise ValueError(f"input state {os.path.basename(prefix)} unreadable: "
                         f"{message}") from None

  def replay(self, position: dict) -> None:
    """Continues from a checkpoint written before iterator states were saved, by
    regenerating and dropping its `train_batches` batches (time grows with them). Such a
    stream was split by the process count that wrote it: `data_shards` must equal it."""
    writers = position.get("process_count", 1)
    if writers != self.data_shards:
      raise IncompatibleCheckpointError(
          f"this checkpoint predates saved input states; its data stream was read by "
          f"{writers} processes, so resume with --gin.train.data_shards={writers} to "
          "continue it exactly.")
    self._iterators = {k: iter(ds.skip(position["train_batches"]))
                       for k, ds in self._datasets.items()}
