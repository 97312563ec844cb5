"""Vocabularies with reserved ids: the byte vocabulary, local SentencePiece models, sentinels
and the UL2 paradigm tokens.

Every ul2x vocabulary ends with the same reserved block, so one set of id formulas
serves both kinds:

  ... | [NLU] [NLG] [S2S] | sentinel S-1 ... sentinel 1, sentinel 0   (the last id)

Sentinel i is `vocab_size - 1 - i` (seqio's span-corruption convention) and the
paradigm tokens sit just below the S sentinels. Both are single ids, inserted by id:
never spelled out as text and split into bytes or pieces.

- Byte vocabulary (ByT5 layout): 0 pad, 1 eos, 2 unk, bytes 0..255 at 3..258, then
  125 extra ids (259..383): the paradigm tokens at 259, 260, 261 and
  `NUM_SENTINELS` = 122 sentinels. `vocab_size` is 384, the models' vocabulary size.
- SentencePiece: a model trained by `python -m ul2x.tasks.train_vocab` ends with the
  user-defined pieces `[NLU] [NLG] [S2S]` (so these strings in text also encode to
  the single ids); seqio appends the sentinels as extra ids, `NUM_SENTINELS` unless
  asked for more (long X-denoiser examples need about length / 6 of them).
- An imported model's Hugging Face tokenizer (`HFTokenizer`): its own reserved tokens
  (e.g. T5's `<extra_id_i>`), read from text as `tokenizer(text)` reads them; a paradigm
  token is its id only where the tokenizer has it as one token.
"""

import functools

import seqio
import tensorflow as tf
from google.protobuf import message

PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# 122 + 3 paradigm tokens = ByT5's 125 extra ids: the byte vocabulary has 384 ids.
NUM_SENTINELS = 122
_TRAIN_VOCAB_HINT = "train one with `python -m ul2x.tasks.train_vocab` (see docs/ul2.md)"


@functools.cache
def byte_vocabulary() -> seqio.ByteVocabulary:
  """The one shared byte vocabulary: 384 ids, the last 125 reserved (module docstring)."""
  return seqio.ByteVocabulary(extra_ids=NUM_SENTINELS + len(PARADIGM_TOKENS))


@functools.cache
def sentencepiece_vocabulary(model_path: str,
                             num_sentinels: int = NUM_SENTINELS) -> seqio.SentencePieceVocabulary:
  """A SentencePiece model from `python -m ul2x.tasks.train_vocab`, plus `num_sentinels`.

  Raises if the model cannot be read or lacks the paradigm-token pieces at its end.
  """
  vocab = seqio.SentencePieceVocabulary(model_path, extra_ids=num_sentinels)
  num_sentinels_of(vocab)
  return vocab


class HFTokenizer:
  """An imported model's Hugging Face tokenizer files (`transformers.AutoTokenizer`) as
  the jobs use a seqio vocabulary for a prompts file and predictions: `encode` gives the
  ids of `tokenizer(text)` without the special tokens it adds (the EOS that infer
  appends after cutting to length), `decode` its text of ids with its special tokens
  spelled out and padding (0) dropped."""

  def __init__(self, directory: str):
    from transformers import AutoTokenizer  # slow to import: only for imported models
    self.directory = directory
    self.tokenizer = AutoTokenizer.from_pretrained(directory)
    self.eos_id = self.tokenizer.eos_token_id
    self.bos_id = self.tokenizer.bos_token_id
    self.vocab_size = len(self.tokenizer)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False).input_ids)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids if int(i) != 0],
                                 skip_special_tokens=False)

  def token_id(self, token: str) -> int:
    """The id of `token` if the tokenizer has it as one token; raises otherwise."""
    found = self.tokenizer.get_vocab().get(token)
    if found is None:
      raise ValueError(f"the tokenizer in {self.directory} has no token {token!r} (its model "
                       "was not trained with ul2x's mode tokens); pass "
                       "--gin.infer.mode_token=None, and write the mode token in the text if "
                       "the model reads it there.")
    return found


def num_sentinels_of(vocab: seqio.Vocabulary) -> int:
  """How many sentinels `vocab` reserves; raises unless it ends with the reserved block."""
  if isinstance(vocab, seqio.ByteVocabulary) and vocab.extra_ids > len(PARADIGM_TOKENS):
    return vocab.extra_ids - len(PARADIGM_TOKENS)
  if not isinstance(vocab, seqio.SentencePieceVocabulary) or vocab.extra_ids < 1:
    raise ValueError(
        f"vocabulary {vocab} is not a ul2x vocabulary (it lacks the paradigm tokens and "
        "sentinels); use ul2x.tasks.vocabularies.byte_vocabulary() or "
        "sentencepiece_vocabulary(path).")
  try:
    first = vocab.vocab_size - vocab.extra_ids - len(PARADIGM_TOKENS)
    pieces = tuple(vocab.tokenizer.id_to_piece(first + j) for j in range(len(PARADIGM_TOKENS)))
  except (tf.errors.OpError, message.DecodeError, RuntimeError) as e:
    raise ValueError(f"cannot load SentencePiece model {vocab.sentencepiece_model_file!r} "
                     f"({' '.join(str(e).split())}); {_TRAIN_VOCAB_HINT}.") from e
  if pieces != PARADIGM_TOKENS:
    raise ValueError(
        f"SentencePiece model {vocab.sentencepiece_model_file!r} does not end with the "
        f"paradigm tokens {' '.join(PARADIGM_TOKENS)} (its last pieces are "
        f"{' '.join(pieces)}); {_TRAIN_VOCAB_HINT}.")
  return vocab.extra_ids


def sentinel_id(vocab: seqio.Vocabulary, i: int) -> int:
  """Id of sentinel `i` (0-based) in `vocab`: `vocab.vocab_size - 1 - i`."""
  count = num_sentinels_of(vocab)
  if not 0 <= i < count:
    raise ValueError(f"sentinel index {i} is out of range: the vocabulary has {count} "
                     f"sentinels (0..{count - 1}).")
  return vocab.vocab_size - 1 - i


def paradigm_token_id(vocab: seqio.Vocabulary, token: str) -> int:
  """Id of the UL2 paradigm (mode) token `token`, one of `PARADIGM_TOKENS` (an
  `HFTokenizer`'s own id of it)."""
  if token not in PARADIGM_TOKENS:
    raise ValueError(f"paradigm token {token!r} is not one of {', '.join(PARADIGM_TOKENS)}.")
  if isinstance(vocab, HFTokenizer):
    return vocab.token_id(token)
  return (vocab.vocab_size - num_sentinels_of(vocab) - len(PARADIGM_TOKENS)
          + PARADIGM_TOKENS.index(token))


def decode_with_reserved(vocab: seqio.Vocabulary, ids) -> str:
  """Text of `ids`, showing paradigm tokens as `[NLU]`..., sentinel i as `<extra_id_i>`
  and EOS as `</s>`; padding is dropped. For looking at examples; training never decodes.
  An `HFTokenizer` spells its own special tokens."""
  if isinstance(vocab, HFTokenizer):
    return vocab.decode(ids)
  names = {paradigm_token_id(vocab, t): t for t in PARADIGM_TOKENS}
  names.update({vocab.vocab_size - 1 - i: f"<extra_id_{i}>"
                for i in range(num_sentinels_of(vocab))})
  names[vocab.eos_id] = "</s>"
  text, run = [], []
  for i in (int(i) for i in ids):
    if i in names:
      text += [vocab.decode(run), names[i]]
      run = []
    elif i != 0:
      run.append(i)
  return "".join(text + [vocab.decode(run)])
