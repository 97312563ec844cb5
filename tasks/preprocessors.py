"""Denoising preprocessors (seqio, tf.data graph mode): token-stream chunks, T5 span
corruption and prefix LM, each optionally led by a UL2 paradigm token, and the plain
causal LM's chunks.

`tokenize_text` turns source examples into `{'targets': int32 [n]}`, one document
each. The denoisers concatenate the documents, each ended by EOS, into one stream
and cut it into chunks of exactly the length their feature lengths allow (T5 cuts a
stream too), so every example is corrupted with the same counts and nothing is
truncated. They emit `{'inputs': int32 [i], 'targets': int32 [t]}`, the paradigm
token's id first in `inputs`, leaving room for the EOS that the task appends next
(`seqio.preprocessors.append_eos_after_trim`). A tail shorter than one chunk is
carried into the next epoch (or dropped after the last one).

Randomness: stateless ops seeded through `seqio.map_over_dataset(num_seeds=...)`, with
the denoiser's description folded in. seqio repeats the source before these
preprocessors, so every epoch is corrupted afresh, and a pipeline built under a fixed
seqio seed gives the same examples every time.
"""

from collections.abc import Mapping
import functools
import logging
import zlib

import gin
import numpy as np
import seqio
import tensorflow as tf

from ul2x.tasks.vocabularies import (PARADIGM_TOKENS, num_sentinels_of, paradigm_token_id,
                                     sentinel_id)

# Statistics further than this from the configured ones get a warning at pipeline build.
_STATISTICS_TOLERANCE = 0.05
# Chunks corrupted together by one vectorized map call.
_BLOCK_SIZE = 64


def _feature_lengths(sequence_length: Mapping[str, int] | None,
                     denoiser: str) -> tuple[int, int]:
  if not sequence_length or "inputs" not in sequence_length or "targets" not in sequence_length:
    raise ValueError(
        f"{denoiser} needs sequence_length with 'inputs' and 'targets', got {sequence_length!r}; "
        "pass task_feature_lengths={'inputs': ..., 'targets': ...}.")
  return int(sequence_length["inputs"]), int(sequence_length["targets"])


def _describe(denoiser: str, paradigm_token: str | None, **params) -> str:
  args = [f"{k}={v}" for k, v in params.items()]
  if paradigm_token:
    args.append(f"paradigm_token={paradigm_token!r}")
  return f"{denoiser}({', '.join(args)})"


def tokenize_text(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                  text_key: str = "text") -> tf.data.Dataset:
  """Source examples -> `{'targets': int32 [n]}`, the text in the targets' vocabulary.

  Takes feature `text_key` of dict examples (TFDS, TFRecord, Python functions) or
  the example itself when it is a bare string (text files, one line per example).
  """
  vocab = output_features["targets"].vocabulary
  dtype = output_features["targets"].dtype
  spec = dataset.element_spec
  if isinstance(spec, Mapping) and text_key not in spec:
    raise ValueError(f"source examples have features {sorted(spec)} but no {text_key!r}; "
                     "pass text_key= the feature that holds the text.")

  @tf.autograph.experimental.do_not_convert
  def tokenize(ex):
    text = ex[text_key] if isinstance(spec, Mapping) else ex
    return {"targets": tf.cast(vocab.encode_tf(text), dtype)}

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def concat_chunks(dataset: tf.data.Dataset, chunk_length: int, separator: int) -> tf.data.Dataset:
  """Concatenates every example's `targets`, each followed by `separator` (EOS), into one
  stream cut into equal chunks. Yields int32 [chunk_length] tensors in stream order.

  Empty documents add nothing. (T5 joins documents without a separator; the EOS
  marks where a document ends, which bytes alone would not.)
  """
  @tf.autograph.experimental.do_not_convert
  def cut(carry, ex):
    document = ex["targets"]
    ending = tf.fill([tf.minimum(tf.size(document), 1)], tf.cast(separator, document.dtype))
    stream = tf.concat([carry, document, ending], axis=0)
    full = tf.size(stream) // chunk_length * chunk_length
    return stream[full:], tf.reshape(stream[:full], [-1, chunk_length])

  start = tf.zeros([0], dataset.element_spec["targets"].dtype)
  return dataset.scan(start, cut).unbatch()


def lm_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Causal LM: the token stream (`concat_chunks`) cut into chunks of the targets length.

  Yields `{'targets': int32 [targets]}`. No EOS is appended: a chunk ends mid-document,
  and the EOS between documents is already in the stream.
  """
  if not sequence_length or "targets" not in sequence_length:
    raise ValueError(f"lm_chunks needs sequence_length with 'targets', got {sequence_length!r}; "
                     "pass task_feature_lengths={'targets': ...}.")
  vocab = output_features["targets"].vocabulary

  @tf.autograph.experimental.do_not_convert
  def as_targets(tokens):
    return {"targets": tokens}

  chunks = concat_chunks(dataset, int(sequence_length["targets"]), vocab.eos_id)
  return chunks.map(as_targets, num_parallel_calls=tf.data.AUTOTUNE)


def _map_blocks(fn, chunks: tf.data.Dataset, vocab: seqio.Vocabulary,
                paradigm_token: str | None, salt: str) -> tf.data.Dataset:
  """Applies `fn(block, seeds)` to blocks of `_BLOCK_SIZE` chunks, then unbatches.

  block: int32 [b, chunk_length], b <= `_BLOCK_SIZE`; `fn` gets two stateless seeds and
  returns `{'inputs', 'targets'}` as [b, ...] tensors (dense or ragged), and the
  paradigm token's id is put in front of `inputs`. Vectorizing over chunks makes short
  chunks about as cheap per token as long ones. seqio gives every task of a mixture the
  same seeds; folding in `salt` (the denoiser's description) gives each its own draws.
  """
  leading = [paradigm_token_id(vocab, paradigm_token)] if paradigm_token else []
  salt_value = zlib.crc32(salt.encode()) & 0x7FFFFFFF

  @tf.autograph.experimental.do_not_convert
  def map_block(block, seeds):
    seeds = [tf.random.experimental.stateless_fold_in(tf.stack(s), salt_value) for s in seeds]
    features = fn(block, seeds)
    if leading:
      column = tf.fill([tf.shape(block)[0], 1], tf.cast(leading[0], block.dtype))
      features["inputs"] = tf.concat([column, features["inputs"]], axis=1)
    return features

  return seqio.map_over_dataset(map_block, num_seeds=2)(chunks.batch(_BLOCK_SIZE)).unbatch()


def span_counts(length: int, noise_density: float,
                mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) in a chunk of `length` (>= 2) tokens, as T5 counts them.

  noise = round(length * density) kept in [1, length - 1]; spans = round(noise /
  mean span) kept in [1, min(noise, length - noise)] so every span is non-empty.
  """
  noise, spans = _span_counts(np.array([length]), noise_density, mean_noise_span_length)
  return int(noise[0]), int(spans[0])


def _span_counts(lengths: np.ndarray, noise_density: float,
                 mean_noise_span_length: float) -> tuple[np.ndarray, np.ndarray]:
  noise = np.clip(np.round(lengths * noise_density), 1, lengths - 1).astype(np.int64)
  spans = np.clip(np.round(noise / mean_noise_span_length), 1,
                  np.minimum(noise, lengths - noise)).astype(np.int64)
  return noise, spans


def span_corruption_chunk_length(sequence_length: Mapping[str, int], noise_density: float = 0.15,
                                 mean_noise_span_length: float = 3.0,
                                 paradigm_token: str | None = None) -> int:
  """Longest chunk whose corrupted inputs and targets, each with EOS, fit `sequence_length`.

  A chunk of `n` tokens with `noise` noise tokens in `spans` spans becomes inputs of
  `n - noise + spans + 1` tokens (+1 with a paradigm token) and targets of
  `noise + spans + 1` tokens.
  """
  name = _describe("span_corruption", paradigm_token, noise_density=noise_density,
                   mean_noise_span_length=mean_noise_span_length)
  if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
    raise ValueError(f"{name} needs 0 < noise_density < 1 and mean_noise_span_length >= 1.")
  inputs_length, targets_length = _feature_lengths(sequence_length, name)
  extra = 2 if paradigm_token else 1  # EOS, and the paradigm token
  lengths = np.arange(2, inputs_length + targets_length + 1)
  noise, spans = _span_counts(lengths, noise_density, mean_noise_span_length)
  fits = (lengths - noise + spans + extra <= inputs_length) & (noise + spans + 1 <= targets_length)
  if not fits.any():
    raise ValueError(
        f"task_feature_lengths inputs={inputs_length}, targets={targets_length} are too short "
        f"for {name}: the minimum is inputs={2 + extra} and targets=3 (a 2-token chunk with "
        "one sentinel and EOS on each side); raise task_feature_lengths.")
  return int(lengths[np.flatnonzero(fits)[-1]])


def _random_segmentation(rows: int | tf.Tensor, num_items: int, num_segments: int,
                          seed) -> tf.Tensor:
  """Uniformly random splits of `num_items` into `num_segments` non-empty parts, per row.

  Returns int32 [rows, num_segments], each row summing to `num_items`: the parts end
  at `num_segments - 1` distinct gaps drawn from the `num_items - 1` gaps between items.
  """
  gap_keys = tf.random.stateless_uniform([rows, num_items - 1], seed)
  cuts = tf.sort(tf.math.top_k(gap_keys, k=num_segments - 1).indices, axis=1) + 1
  first = tf.zeros([rows, 1], tf.int32)
  bounds = tf.concat([first, cuts, first + num_items], axis=1)
  return bounds[:, 1:] - bounds[:, :-1]


def _noise_mask(rows: int | tf.Tensor, length: int, num_noise: int, num_spans: int,
                seeds) -> tf.Tensor:
  """bool [rows, length]: per row, `num_spans` noise spans holding `num_noise` tokens.

  Noise and kept span lengths are independent random segmentations; spans
  alternate kept, noise, kept, ..., so a chunk starts with kept tokens and ends in noise.
  """
  noise_lengths = _random_segmentation(rows, num_noise, num_spans, seeds[0])
  kept_lengths = _random_segmentation(rows, length - num_noise, num_spans, seeds[1])
  span_ends = tf.cumsum(tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=2),
                                   [rows, 2 * num_spans]), axis=1)
  positions = tf.broadcast_to(tf.range(length), [rows, length])
  return tf.searchsorted(span_ends, positions, side="right") % 2 == 1


def _spans_to_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor, first_sentinel: int,
                        out_length: int) -> tf.Tensor:
  """Replaces the k-th run of masked tokens in each row by sentinel k (`first_sentinel - k`).

  tokens: int32 [rows, n]; span_mask: bool [rows, n] with the same number of masked
  tokens and runs in every row -> int32 [rows, out_length], out_length = n - masked + runs.
  """
  follows_masked = tf.pad(span_mask[:, :-1], [[0, 0], [1, 0]])
  run_starts = span_mask & ~follows_masked
  sentinels = first_sentinel + 1 - tf.cumsum(tf.cast(run_starts, tokens.dtype), axis=1)
  kept = tf.boolean_mask(tf.where(run_starts, sentinels, tokens), ~(span_mask & follows_masked))
  return tf.reshape(kept, [-1, out_length])


def _warn_if_off(name: str, chunk_length: int, measured: dict[str, float],
                 configured: dict[str, float]) -> None:
  off = {k: round(v, 3) for k, v in measured.items()
         if abs(v - configured[k]) > _STATISTICS_TOLERANCE * configured[k]}
  if off:
    _warn_once(f"{name} makes chunks of {chunk_length} tokens with {off} instead of "
               f"{ {k: configured[k] for k in off} }: raise task_feature_lengths for the "
               "configured statistics.")


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    mean_noise_span_length: float = 3.0, noise_density: float = 0.15,
                    paradigm_token: str | None = None) -> tf.data.Dataset:
  """T5 span corruption of stream chunks of `span_corruption_chunk_length(...)` tokens.

  Each chunk's noise spans are removed from `inputs`, each replaced by one sentinel
  (sentinel 0, 1, ... in order); `targets` are those sentinels each followed by the
  span it stands for. With `paradigm_token` (e.g. '[NLU]') its id leads `inputs`.
  Every chunk has the same counts (`span_counts`), so inputs: int32 [<= inputs - 1] and
  targets: int32 [<= targets - 1] have fixed lengths (EOS comes next).
  """
  vocab = output_features["targets"].vocabulary
  name = _describe("span_corruption", paradigm_token, noise_density=noise_density,
                   mean_noise_span_length=mean_noise_span_length)
  chunk_length = span_corruption_chunk_length(sequence_length, noise_density,
                                              mean_noise_span_length, paradigm_token)
  num_noise, num_spans = span_counts(chunk_length, noise_density, mean_noise_span_length)
  num_sentinels = num_sentinels_of(vocab)
  if num_spans > num_sentinels:
    lengths = np.arange(2, chunk_length)
    noise, spans = _span_counts(lengths, noise_density, mean_noise_span_length)
    i = np.flatnonzero(spans <= num_sentinels)[-1]
    extra = 2 if paradigm_token else 1
    raise ValueError(
        f"{name} with task_feature_lengths {dict(sequence_length)} makes chunks of "
        f"{chunk_length} tokens with {num_spans} noise spans, but the vocabulary has "
        f"{num_sentinels} sentinels; use task_feature_lengths of at most inputs="
        f"{lengths[i] - noise[i] + spans[i] + extra}, targets={noise[i] + spans[i] + 1} "
        "for this denoiser, or a SentencePiece vocabulary with more sentinels.")
  _warn_if_off(name, chunk_length,
               {"noise_density": num_noise / chunk_length,
                "mean_noise_span_length": num_noise / num_spans},
               {"noise_density": noise_density, "mean_noise_span_length": mean_noise_span_length})
  first_sentinel = sentinel_id(vocab, 0)

  def corrupt(tokens, seeds):
    mask = _noise_mask(tf.shape(tokens)[0], chunk_length, num_noise, num_spans, seeds)
    return {"inputs": _spans_to_sentinels(tokens, mask, first_sentinel,
                                          chunk_length - num_noise + num_spans),
            "targets": _spans_to_sentinels(tokens, ~mask, first_sentinel, num_noise + num_spans)}

  return _map_blocks(corrupt, concat_chunks(dataset, chunk_length, vocab.eos_id), vocab,
                     paradigm_token, salt=name)


def prefix_lm_split(sequence_length: Mapping[str, int],
                    paradigm_token: str | None = None) -> tuple[int, int, int]:
  """(chunk length, lowest cut, highest cut) of `prefix_lm` for these feature lengths.

  The chunk is as long as the longer side allows; the cut (= prefix length) is
  uniform over the points that leave both sides non-empty and within their lengths,
  so with equal lengths it is uniform over the whole chunk.
  """
  name = _describe("prefix_lm", paradigm_token)
  inputs_length, targets_length = _feature_lengths(sequence_length, name)
  max_inputs = inputs_length - (2 if paradigm_token else 1)
  max_targets = targets_length - 1
  if max_inputs < 1 or max_targets < 1:
    raise ValueError(
        f"task_feature_lengths inputs={inputs_length}, targets={targets_length} are too short "
        f"for {name}: the minimum is inputs={3 if paradigm_token else 2} and targets=2 "
        "(one token and EOS each, after the paradigm token); raise task_feature_lengths.")
  chunk_length = max(max_inputs, max_targets, 2)
  return chunk_length, max(1, chunk_length - max_targets), min(chunk_length - 1, max_inputs)


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature],
              paradigm_token: str | None = None) -> tf.data.Dataset:
  """Prefix LM (UL2's S-denoiser): stream chunks cut at a random point (`prefix_lm_split`).

  `inputs` is the prefix (led by the paradigm token's id, if given), `targets` the
  rest. inputs: int32 [<= inputs - 1], targets: int32 [1 .. targets - 1] (EOS comes next).
  """
  vocab = output_features["targets"].vocabulary
  chunk_length, lowest, highest = prefix_lm_split(sequence_length, paradigm_token)

  def split(tokens, seeds):
    cuts = tf.random.stateless_uniform([tf.shape(tokens)[0]], seeds[0], minval=lowest,
                                       maxval=highest + 1, dtype=tf.int32)
    is_prefix = tf.range(chunk_length)[tf.newaxis] < cuts[:, tf.newaxis]
    return {"inputs": tf.ragged.boolean_mask(tokens, is_prefix),
            "targets": tf.ragged.boolean_mask(tokens, ~is_prefix)}

  return _map_blocks(split, concat_chunks(dataset, chunk_length, vocab.eos_id), vocab,
                     paradigm_token, salt=_describe("prefix_lm", paradigm_token))


@gin.configurable
def prepend_mode_token(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                       mode_token: str | None = None) -> tf.data.Dataset:
  """Puts the id of `mode_token` ('[NLU]', '[NLG]' or '[S2S]') in front of `inputs`.

  UL2 mode switching: fine-tune with the paradigm token of the pretraining mode the
  task resembles ([NLU] classification, [NLG] long generation, [S2S] sequence to
  sequence). Apply after tokenizing; inputs: [n] -> [n + 1]. `mode_token` is passed
  by the task's registration or, when that leaves it open, chosen in gin.
  """
  if mode_token is None:
    raise ValueError(
        "no mode token chosen for fine-tuning; set it in gin, e.g. "
        f"--gin.prepend_mode_token.mode_token=\"'[NLU]'\" (one of {', '.join(PARADIGM_TOKENS)}).")
  vocab = output_features["inputs"].vocabulary
  token_id = paradigm_token_id(vocab, mode_token)

  @tf.autograph.experimental.do_not_convert
  def prepend(ex):
    ex = dict(ex)
    ex["inputs"] = tf.concat([tf.constant([token_id], ex["inputs"].dtype), ex["inputs"]], 0)
    return ex

  return dataset.map(prepend, num_parallel_calls=tf.data.AUTOTUNE)
