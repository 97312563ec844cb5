"""Denoising preprocessors (seqio, tf.data graph mode): chunking, T5 span corruption, prefix LM.

Input examples carry `targets`: int32 [n] token ids of one document (after
`seqio.preprocessors.tokenize`). The denoisers cut documents into chunks and emit
`{'inputs': int32 [i], 'targets': int32 [t]}` with room left for the EOS that the
task appends afterwards (`seqio.preprocessors.append_eos_after_trim`), so nothing
is ever truncated. Every random choice is a stateless op seeded through
`seqio.map_over_dataset(num_seeds=...)`: a pipeline built under a fixed seqio seed
gives the same examples every time.
"""

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from ul2x.tasks.vocabularies import sentinel_id


def _feature_lengths(sequence_length: Mapping[str, int] | None,
                     denoiser: str) -> tuple[int, int]:
  if not sequence_length or "inputs" not in sequence_length or "targets" not in sequence_length:
    raise ValueError(
        f"{denoiser} needs sequence_length with 'inputs' and 'targets', got {sequence_length!r}; "
        "pass task_feature_lengths={'inputs': ..., 'targets': ...}.")
  return int(sequence_length["inputs"]), int(sequence_length["targets"])


def chunk_targets(dataset: tf.data.Dataset, chunk_length: int,
                  min_length: int = 1) -> tf.data.Dataset:
  """Cuts each example's `targets` [n] into consecutive chunks of `chunk_length` tokens.

  Yields `{'targets': int32 [k]}` per chunk, `min_length <= k <= chunk_length` (only
  a document's last chunk is short; shorter ones are dropped). Other features are dropped.
  """
  def to_chunks(ex):
    tokens = ex["targets"]
    starts = tf.range(0, tf.size(tokens), chunk_length)
    return {"targets": tf.RaggedTensor.from_row_lengths(
        tokens, tf.minimum(chunk_length, tf.size(tokens) - starts))}

  chunks = dataset.map(to_chunks, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return chunks.filter(lambda ex: tf.size(ex["targets"]) >= min_length)


def _span_counts(lengths: np.ndarray, noise_density: float,
                 mean_noise_span_length: float) -> tuple[np.ndarray, np.ndarray]:
  """(noise tokens, noise spans) per chunk length, as T5: int64 [len(lengths)] each.

  noise = round(length * density) kept in [1, length - 1]; spans = round(noise /
  mean span) kept in [1, min(noise, length - noise)] so every span is non-empty.
  Lengths below 2 are treated as 2 (such chunks are never corrupted).
  """
  lengths = np.maximum(np.asarray(lengths, np.int64), 2)
  noise = np.clip(np.round(lengths * noise_density), 1, lengths - 1).astype(np.int64)
  spans = np.clip(np.round(noise / mean_noise_span_length), 1,
                  np.minimum(noise, lengths - noise)).astype(np.int64)
  return noise, spans


def span_corruption_chunk_length(sequence_length: Mapping[str, int], noise_density: float = 0.15,
                                 mean_noise_span_length: float = 3.0) -> int:
  """Longest chunk length whose corrupted inputs and targets, each with EOS, fit.

  A chunk of `n` tokens with `noise` noise tokens in `spans` spans becomes inputs of
  `n - noise + spans + 1` and targets of `noise + spans + 1` tokens; this returns the
  largest `n` for which every length 2..n fits `sequence_length`.
  """
  if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
    raise ValueError(
        f"span_corruption needs 0 < noise_density < 1 and mean_noise_span_length >= 1, got "
        f"noise_density={noise_density}, mean_noise_span_length={mean_noise_span_length}.")
  inputs_length, targets_length = _feature_lengths(sequence_length, "span_corruption")
  lengths = np.arange(2, inputs_length + targets_length + 1)
  noise, spans = _span_counts(lengths, noise_density, mean_noise_span_length)
  fits = (lengths - noise + spans + 1 <= inputs_length) & (noise + spans + 1 <= targets_length)
  num_fitting = int(np.cumprod(fits).sum())
  if num_fitting == 0:
    raise ValueError(
        f"sequence_length inputs={inputs_length}, targets={targets_length} is too short for "
        "span_corruption: the minimum is inputs=3 and targets=3 (a 2-token chunk with one "
        "sentinel and EOS on each side); raise task_feature_lengths.")
  return int(lengths[num_fitting - 1])


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
  """A uniformly random split of `num_items` into `num_segments` non-empty parts.

  Returns int32 [num_segments] summing to `num_items`: the parts end at
  `num_segments - 1` distinct gaps drawn from the `num_items - 1` gaps between items.
  """
  gap_keys = tf.random.stateless_uniform([num_items - 1], seed)
  cuts = tf.sort(tf.math.top_k(gap_keys, k=num_segments - 1).indices) + 1
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def _noise_mask(length: tf.Tensor, num_noise: tf.Tensor, num_spans: tf.Tensor, seeds) -> tf.Tensor:
  """bool [length]: `num_spans` noise spans holding `num_noise` tokens in all.

  Noise and non-noise span lengths are independent random segmentations; spans
  alternate non-noise, noise, non-noise, ... so the chunk starts with kept tokens.
  """
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  kept_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  return tf.repeat(tf.tile([False, True], [num_spans]), span_lengths)


def _spans_to_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor, first_sentinel: int) -> tf.Tensor:
  """Replaces the k-th run of masked tokens by sentinel k (`first_sentinel - k`).

  tokens: int32 [n]; span_mask: bool [n] -> int32 [n - masked tokens + runs].
  """
  follows_masked = tf.concat([[False], span_mask[:-1]], axis=0)
  run_starts = span_mask & ~follows_masked
  sentinels = first_sentinel + 1 - tf.cumsum(tf.cast(run_starts, tokens.dtype))
  return tf.boolean_mask(tf.where(run_starts, sentinels, tokens), ~(span_mask & follows_masked))


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    mean_noise_span_length: float = 3.0,
                    noise_density: float = 0.15) -> tf.data.Dataset:
  """T5 span corruption of chunks of `span_corruption_chunk_length(...)` tokens.

  Each chunk's noise spans are removed from `inputs`, each replaced by one sentinel
  (sentinel 0, 1, ... in order); `targets` are those sentinels each followed by the
  span it stands for. inputs: int32 [<= inputs - 1], targets: int32 [<= targets - 1].
  """
  vocab = output_features["targets"].vocabulary
  chunk_length = span_corruption_chunk_length(sequence_length, noise_density,
                                              mean_noise_span_length)
  noise_table, span_table = _span_counts(np.arange(chunk_length + 1), noise_density,
                                         mean_noise_span_length)
  if span_table.max() > vocab.extra_ids:
    raise ValueError(
        f"span_corruption with sequence_length {dict(sequence_length)} makes chunks of "
        f"{chunk_length} tokens with up to {span_table.max()} noise spans, but the vocabulary "
        f"has {vocab.extra_ids} sentinels; use shorter feature lengths or a larger "
        "mean_noise_span_length.")
  first_sentinel = sentinel_id(vocab, 0)

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(ex, seeds):
    tokens = ex["targets"]
    length = tf.size(tokens)
    mask = _noise_mask(length, tf.gather(tf.constant(noise_table, tf.int32), length),
                       tf.gather(tf.constant(span_table, tf.int32), length), seeds)
    return {"inputs": _spans_to_sentinels(tokens, mask, first_sentinel),
            "targets": _spans_to_sentinels(tokens, ~mask, first_sentinel)}

  return corrupt(chunk_targets(dataset, chunk_length, min_length=2))


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Prefix LM: chunks of `max(inputs, targets) - 1` tokens cut at a random point.

  `inputs` is the prefix, `targets` the rest; the cut is uniform over the points
  that leave both non-empty and within their lengths less EOS, so with equal
  lengths it is uniform over the whole chunk. `output_features` is unused.
  inputs: int32 [1 .. inputs - 1], targets: int32 [1 .. targets - 1].
  """
  del output_features
  inputs_length, targets_length = _feature_lengths(sequence_length, "prefix_lm")
  if min(inputs_length, targets_length) < 2:
    raise ValueError(
        f"sequence_length inputs={inputs_length}, targets={targets_length} is too short for "
        "prefix_lm: the minimum is inputs=2 and targets=2 (one token and EOS each); "
        "raise task_feature_lengths.")

  @seqio.map_over_dataset(num_seeds=1)
  def split(ex, seed):
    tokens = ex["targets"]
    length = tf.size(tokens)
    lowest = tf.maximum(1, length - (targets_length - 1))
    highest = tf.minimum(length - 1, inputs_length - 1)
    cut = tf.random.stateless_uniform([], seed, minval=lowest, maxval=highest + 1, dtype=tf.int32)
    return {"inputs": tokens[:cut], "targets": tokens[cut:]}

  chunk_length = max(inputs_length, targets_length) - 1
  return split(chunk_targets(dataset, chunk_length, min_length=2))
