"""The default seqio tasks ul2x ships: over the embedded corpus `ul2x_span_corruption`,
`ul2x_prefix_lm`, the causal LM `ul2x_lm` and the UL2 mixture `ul2x_ul2` with its seven
member tasks `ul2x_ul2_<denoiser>`; and the synthetic, learnable seq2seq task `ul2x_reverse`."""

import functools

import numpy as np
import seqio
import tensorflow as tf

from ul2x.tasks import finetune, metrics, preprocessors, registry, ul2
from ul2x.tasks.corpus import SPLITS, corpus_lines

UL2_MIXTURE_NAME = "ul2x_ul2"
TASK_NAMES = ("ul2x_span_corruption", "ul2x_prefix_lm", "ul2x_lm", "ul2x_reverse") + tuple(
    f"{UL2_MIXTURE_NAME}_{d.name}" for d in ul2.UL2_DENOISERS)
# ul2x_reverse: split -> (examples, seed). Its strings are REVERSE_LETTERS, 2 to 6 long.
REVERSE_SPLITS = {"train": (20_000, 0), "validation": (200, 1), "test": (200, 2)}
REVERSE_LETTERS = "abcdefghij"


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


@functools.cache
def reverse_strings(split: str) -> tuple[str, ...]:
  """The inputs of `ul2x_reverse`'s `split`: random strings, the same on every call."""
  count, seed = REVERSE_SPLITS[split]
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 7, size=count)
  letters = rng.integers(0, len(REVERSE_LETTERS), size=(count, 6))
  return tuple("".join(REVERSE_LETTERS[j] for j in row[:n]) for row, n in zip(letters, lengths))


def reverse_dataset(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
  """`{'inputs', 'targets': tf.string []}`: a string of `reverse_strings(split)` and its reverse."""
  del shuffle_files, seed  # the strings are random already; seqio's buffer shuffles the rest
  strings = reverse_strings(split)
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": list(strings), "targets": [s[::-1] for s in strings]})


def register_tasks() -> None:
  """Registers (or re-registers, replacing) the tasks in `TASK_NAMES` and `ul2x_ul2`."""
  source = seqio.FunctionDataSource(corpus_dataset, splits=SPLITS)
  registry.register_denoising_task("ul2x_span_corruption", source,
                                   preprocessors.span_corruption)
  registry.register_denoising_task("ul2x_prefix_lm", source, preprocessors.prefix_lm)
  registry.register_lm_task("ul2x_lm", source)
  finetune.register_finetune_task(
      "ul2x_reverse", seqio.FunctionDataSource(reverse_dataset, splits=tuple(REVERSE_SPLITS)),
      mode_token="[S2S]", postprocess_fn=metrics.as_text, metric_fns=[metrics.exact_match])
  ul2.register_ul2_mixture(UL2_MIXTURE_NAME, source)
