"""Generic seqio registration helpers: output features and (re-)registering a task, a
denoising task or a plain causal LM task over any seqio source, and a TFDS source that never
downloads. The tasks ul2x ships are in `default_tasks.py` and `glue.py`, the UL2 mixture of
denoisers in `ul2.py`."""

from collections.abc import Callable, Sequence
import functools

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from ul2x.tasks import preprocessors
from ul2x.tasks.vocabularies import byte_vocabulary


def output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
  """`inputs` and `targets`: int32 ids of `vocabulary` (default: bytes), EOS appended."""
  vocabulary = vocabulary or byte_vocabulary()
  return {key: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
          for key in ("inputs", "targets")}


def register_task(name: str, *, metric_fns: Sequence[Callable[..., dict]] = (),
                  **kwargs) -> seqio.Task:
  """`seqio.TaskRegistry.add(name, metric_fns=..., **kwargs)`, replacing a task `name`."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, metric_fns=list(metric_fns), **kwargs)


def register_denoising_task(name: str, source: seqio.DataSourceInterface,
                            denoiser: Callable[..., tf.data.Dataset], *, text_key: str = "text",
                            vocabulary: seqio.Vocabulary | None = None,
                            shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> seqio.Task:
  """Registers (replacing) task `name`: text `text_key` from `source`, tokenized,
  `denoiser` (a denoiser of `preprocessors`), EOS; examples are shuffled in a buffer of
  `shuffle_buffer_size`."""
  return register_task(
      name, source=source, output_features=output_features(vocabulary),
      preprocessors=[functools.partial(preprocessors.tokenize_text, text_key=text_key), denoiser,
                     seqio.preprocessors.append_eos_after_trim],
      shuffle_buffer_size=shuffle_buffer_size)


def register_lm_task(name: str, source: seqio.DataSourceInterface, *, text_key: str = "text",
                     vocabulary: seqio.Vocabulary | None = None,
                     shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> seqio.Task:
  """Registers (replacing) a plain causal LM task `name`: text `text_key` from `source`,
  tokenized and cut into chunks of the targets length (`preprocessors.lm_chunks`).

  Its only feature is `targets` (no EOS appended), so decoder-only models train on it
  fully causally; pass task_feature_lengths={'targets': ...}.
  """
  vocabulary = vocabulary or byte_vocabulary()
  return register_task(
      name, source=source,
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
      preprocessors=[functools.partial(preprocessors.tokenize_text, text_key=text_key),
                     preprocessors.lm_chunks],
      shuffle_buffer_size=shuffle_buffer_size)



class LocalTfdsDataSource(seqio.TfdsDataSource):
  """seqio's `TfdsDataSource` that only reads a dataset already built in the TFDS data
  directory (`--tfds_data_dir`, else `TFDS_DATA_DIR`, else ~/tensorflow_datasets): it
  never downloads, and a dataset not built there stops the job with one line naming
  the `tfds build` command. `tfds_name` has a version ('glue/sst2:2.0.0'); `splits`
  maps our split names to the dataset's."""

  def __init__(self, tfds_name: str, splits: dict[str, str]):
    super().__init__(tfds_name, splits=splits, read_only=True)

  def get_dataset(self, split=None, *args, **kwargs) -> tf.data.Dataset:
    try:
      return super().get_dataset(split, *args, **kwargs)
    except AssertionError:  # TFDS: "could not find data in <dir>"
      name = self.tfds_dataset.name.split(":")[0]
      root = self.tfds_dataset.data_dir or tfds.core.constants.DATA_DIR
      raise ValueError(
          f"TFDS dataset {name} is not built in {root}; build it with `tfds build {name} "
          f"--data_dir={root}` (this downloads it) and pass --tfds_data_dir={root}.") from None

  # TFDS knows a split's files and size only once built (not when mocked in tests): then
  # seqio shards the examples instead of the files, and caches nothing in memory.
  def list_shards(self, split: str) -> list[str]:
    try:
      return super().list_shards(split)
    except KeyError:
      return []

  def num_input_examples(self, split: str) -> int | None:
    try:
      return super().num_input_examples(split)
    except KeyError:
      return None
