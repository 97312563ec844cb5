"""The ul2x seqio tasks over the embedded corpus: `ul2x_span_corruption`, `ul2x_prefix_lm`
and the UL2 mixture `ul2x_ul2` with its seven member tasks `ul2x_ul2_<denoiser>`."""

import seqio
import tensorflow as tf

from ul2x.tasks import preprocessors, ul2
from ul2x.tasks.corpus import SPLITS, corpus_lines
from ul2x.tasks.ul2 import output_features  # noqa: F401  (part of this module's API)

UL2_MIXTURE_NAME = "ul2x_ul2"
TASK_NAMES = ("ul2x_span_corruption", "ul2x_prefix_lm") + tuple(
    f"{UL2_MIXTURE_NAME}_{d.name}" for d in ul2.UL2_DENOISERS)


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


def register_tasks() -> None:
  """Registers (or re-registers, replacing) the tasks in `TASK_NAMES` and `ul2x_ul2`."""
  source = seqio.FunctionDataSource(corpus_dataset, splits=SPLITS)
  ul2.register_denoising_task("ul2x_span_corruption", source, preprocessors.span_corruption)
  ul2.register_denoising_task("ul2x_prefix_lm", source, preprocessors.prefix_lm)
  ul2.register_ul2_mixture(UL2_MIXTURE_NAME, source)
