"""The ul2x seqio tasks over the embedded corpus: `ul2x_span_corruption`, `ul2x_prefix_lm`."""

import functools

import seqio
import tensorflow as tf

from ul2x.tasks import preprocessors
from ul2x.tasks.corpus import SPLITS, corpus_lines
from ul2x.tasks.vocabularies import byte_vocabulary

TASK_NAMES = ("ul2x_span_corruption", "ul2x_prefix_lm")


def corpus_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  """`{'text': tf.string []}` per paragraph of the corpus split (never empty).

  Shuffled in full only when `seed` is given: seqio shards this dataset afterwards,
  and hosts sharding differently shuffled streams would read overlapping examples.
  """
  lines = corpus_lines(split)
  ds = tf.data.Dataset.from_tensor_slices({"text": lines})
  if shuffle_files and seed is not None:
    ds = ds.shuffle(len(lines), seed=seed)
  return ds


def output_features() -> dict[str, seqio.Feature]:
  """`inputs` and `targets`: int32 byte-vocabulary ids, EOS appended."""
  return {key: seqio.Feature(byte_vocabulary(), add_eos=True, dtype=tf.int32)
          for key in ("inputs", "targets")}


def register_tasks() -> None:
  """Registers (or re-registers, replacing) the tasks in `TASK_NAMES`."""
  source = seqio.FunctionDataSource(corpus_dataset, splits=SPLITS)
  for name, denoiser in zip(TASK_NAMES, (preprocessors.span_corruption, preprocessors.prefix_lm)):
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=output_features(),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            denoiser,
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[],
    )
