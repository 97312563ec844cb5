"""Generic seqio registration helpers: output features and (re-)registering a task, a
denoising task or a plain causal LM task over any seqio source. The tasks ul2x ships are in
`default_tasks.py`, the UL2 mixture of denoisers in `ul2.py`."""

from collections.abc import Callable, Sequence
import functools

import seqio
import tensorflow as tf

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
