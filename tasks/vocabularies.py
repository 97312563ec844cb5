"""The byte vocabulary (ByT5 layout) and its span-corruption sentinels.

Ids: 0 pad, 1 eos, 2 unk, bytes 0..255 at 3..258, then `NUM_SENTINELS` extra
ids on top; sentinel i is `vocab_size - 1 - i` (sentinel 0 is the last id).
"""

import functools

import seqio

NUM_SENTINELS = 100


@functools.cache
def byte_vocabulary() -> seqio.ByteVocabulary:
  """The one shared `seqio.ByteVocabulary(extra_ids=NUM_SENTINELS)`; vocab_size 359."""
  return seqio.ByteVocabulary(extra_ids=NUM_SENTINELS)


def sentinel_id(vocab: seqio.Vocabulary, i: int) -> int:
  """Id of sentinel `i` (0-based) in `vocab`: `vocab.vocab_size - 1 - i`."""
  if not 0 <= i < vocab.extra_ids:
    raise ValueError(
        f"sentinel index {i} is out of range: the vocabulary has {vocab.extra_ids} "
        f"sentinels (0..{vocab.extra_ids - 1}).")
  return vocab.vocab_size - 1 - i
