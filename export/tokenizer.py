"""Tokenizer files for an exported model: ul2x's vocabularies written so that
`transformers.AutoTokenizer.from_pretrained(export_dir)` encodes text to ul2x's ids.

The paradigm tokens `[NLU] [NLG] [S2S]` and the sentinels `<extra_id_i>` (seqio's
spelling) are special added tokens at ul2x's ids (tasks/vocabularies.py): each is one
id, matched in text before the rest is encoded, as ul2x inserts them by id. EOS (1)
is appended as T5 tokenizers do; pad is 0.

- Byte vocabulary: `ByT5Tokenizer` (bytes + 3), its added tokens pinned to our ids.
- SentencePiece: `spiece.model` (the model as trained) and a `tokenizer.json` built from
  it for the `tokenizers` backend, with SentencePiece's normalizer, byte fallback and
  whitespace handling; transformers' T5Tokenizer would rebuild its own pipeline without
  byte fallback and so encode rare text differently.

The files are written directly (JSON and the copied model): exporting needs neither
transformers nor tokenizers.
"""

import base64
import os

import seqio
import tensorflow as tf
from sentencepiece import sentencepiece_model_pb2

from ul2x.export import files
from ul2x.tasks import vocabularies

CONFIG = "tokenizer_config.json"
SPIECE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
# ul2x's fixed ids 0, 1, 2 (seqio pads with 0; generation_config.json says pad 0, eos 1).
_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
_NORMAL = _PIECE.NORMAL
# SentencePiece matches only these pieces in text; the others (control, byte, unused)
# get a score Unigram never prefers, or a literal "<0x41>" would encode to the byte piece.
_FROM_TEXT = (_PIECE.NORMAL, _PIECE.USER_DEFINED)
_NEVER = -1e9
_BPE = sentencepiece_model_pb2.TrainerSpec.BPE


def write_tokenizer(directory: str, vocabulary) -> None:
  """Writes the transformers tokenizer files for `vocabulary` (a seqio.ByteVocabulary as
  tasks.vocabularies.byte_vocabulary() makes it, or a seqio.SentencePieceVocabulary from
  tasks.vocabularies.sentencepiece_vocabulary) into `directory` (which exists)."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    _write_byte(directory, vocabulary)
  elif isinstance(vocabulary, seqio.SentencePieceVocabulary):
    _write_sentencepiece(directory, vocabulary)
  else:
    raise ValueError(
        f"cannot write tokenizer files for a {type(vocabulary).__name__}: ul2x exports "
        "seqio.ByteVocabulary (vocabularies.byte_vocabulary()) and "
        "seqio.SentencePieceVocabulary (vocabularies.sentencepiece_vocabulary(path)).")


def _reserved_tokens(vocabulary: seqio.Vocabulary) -> dict[int, str]:
  """{id: token} of the paradigm tokens and sentinels, in id order."""
  tokens = {vocabularies.paradigm_token_id(vocabulary, token): token
            for token in vocabularies.PARADIGM_TOKENS}
  tokens.update({vocabularies.sentinel_id(vocabulary, i): f"<extra_id_{i}>"
                 for i in range(vocabularies.num_sentinels_of(vocabulary))})
  return dict(sorted(tokens.items()))


def _added_token(content: str) -> dict:
  # Matched on the raw text with its neighbours' spaces kept: ul2x encodes the text on
  # either side of a reserved token as it stands.
  return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True}


def _config(tokenizer_class: str, reserved: dict[int, str], **extra) -> dict:
  return {"tokenizer_class": tokenizer_class, **_SPECIALS,
          "additional_special_tokens": list(reserved.values()),
          # transformers' clean-up would drop spaces before punctuation when decoding.
          "clean_up_tokenization_spaces": False, **extra}


def _write_byte(directory: str, vocabulary: seqio.ByteVocabulary) -> None:
  """ByT5Tokenizer numbers bytes as we do; its own extra ids would put <extra_id_0> at
  259, so extra_ids=0 and our reserved tokens pinned by id instead."""
  reserved = _reserved_tokens(vocabulary)
  decoder = {str(i): _added_token(token) for i, token in reserved.items()}
  config = _config("ByT5Tokenizer", reserved, extra_ids=0, added_tokens_decoder=decoder)
  files.write_json(os.path.join(directory, CONFIG), config)


def _write_sentencepiece(directory: str, vocabulary: seqio.SentencePieceVocabulary) -> None:
  reserved = _reserved_tokens(vocabulary)  # raises unless it ends with the reserved block
  with tf.io.gfile.GFile(vocabulary.sentencepiece_model_file, "rb") as f:
    raw = f.read()
  model = sentencepiece_model_pb2.ModelProto.FromString(raw)
  first = tuple(p.piece for p in model.pieces[:len(_SPECIALS)])
  if first != tuple(_SPECIALS.values()):
    raise ValueError(
        f"SentencePiece model {vocabulary.sentencepiece_model_file!r} starts with "
        f"{' '.join(first)}, not ul2x's {' '.join(_SPECIALS.values())} at ids 0, 1, 2; train "
        "it with `python -m ul2x.tasks.train_vocab`.")
  with open(os.path.join(directory, SPIECE), "wb") as f:
    f.write(raw)
  files.write_json(os.path.join(directory, TOKENIZER_JSON), _tokenizer_json(model, reserved))
  files.write_json(os.path.join(directory, CONFIG), _config("PreTrainedTokenizerFast", reserved))


def _tokenizer_json(model: sentencepiece_model_pb2.ModelProto, reserved: dict[int, str]) -> dict:
  """The `tokenizers` serialization of `model` plus the sentinels: each text chunk between
  reserved tokens is normalized, prefixed and segmented as SentencePiece does it."""
  tokens = dict(enumerate(_SPECIALS.values())) | reserved
  added = [{"id": i, **_added_token(token)} for i, token in tokens.items()]
  eos = {"id": "</s>", "type_id": 0}
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
      "normalizer": _normalizer(model.normalizer_spec), "pre_tokenizer": None,
      "post_processor": {
          "type": "TemplateProcessing",
          "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos}],
          "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": eos},
                   {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": eos}],
          "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
      "decoder": _decoder(model),
      # seqio appends the sentinels past the model's pieces.
      "model": _model(model, [token for i, token in reserved.items() if i >= len(model.pieces)]),
  }


def _replace(pattern: dict, content: str) -> dict:
  return {"type": "Replace", "pattern": pattern, "content": content}


def _normalizer(spec: sentencepiece_model_pb2.NormalizerSpec) -> dict:
  """SentencePiece's normalization: the character map, then (as set in `spec`) the extra
  spaces removed, spaces escaped as '▁' and the dummy '▁' prefixed. Prepend leaves an
  empty chunk empty, as SentencePiece does."""
  steps = []
  if spec.precompiled_charsmap:
    steps.append({"type": "Precompiled", "precompiled_charsmap":
                  base64.b64encode(spec.precompiled_charsmap).decode("ascii")})
  if spec.remove_extra_whitespaces:
    steps += [_replace({"Regex": r"\A +| +\z"}, ""), _replace({"Regex": " {2,}"}, " ")]
  if spec.escape_whitespaces:
    steps.append(_replace({"String": " "}, "▁"))
  if spec.add_dummy_prefix:
    steps.append({"type": "Prepend", "prepend": "▁"})
  return {"type": "Sequence", "normalizers": steps}


def _decoder(model: sentencepiece_model_pb2.ModelProto) -> dict:
  steps = [_replace({"String": "▁"}, " ")]
  if model.trainer_spec.byte_fallback:
    steps.append({"type": "ByteFallback"})
  steps.append({"type": "Fuse"})
  if model.normalizer_spec.add_dummy_prefix:  # only the text's first space is the dummy
    steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  return {"type": "Sequence", "decoders": steps}


def _model(model: sentencepiece_model_pb2.ModelProto, sentinels: list[str]) -> dict:
  """Unigram or BPE over the model's pieces, the sentinels appended at their ids."""
  pieces = [(p.piece, p.score if p.type in _FROM_TEXT else _NEVER) for p in model.pieces]
  pieces += [(s, _NEVER) for s in sentinels]
  byte_fallback = model.trainer_spec.byte_fallback
  if model.trainer_spec.model_type != _BPE:
    return {"type": "Unigram", "unk_id": model.trainer_spec.unk_id,
            "vocab": [list(p) for p in pieces], "byte_fallback": byte_fallback}
  return {"type": "BPE", "dropout": None, "unk_token": model.trainer_spec.unk_piece,
          "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
          "byte_fallback": byte_fallback, "ignore_merges": False,
          "vocab": {piece: i for i, (piece, _) in enumerate(pieces)},
          "merges": _merges(model)}


def _merges(model: sentencepiece_model_pb2.ModelProto) -> list[list[str]]:
  """BPE merges in SentencePiece's order: it joins the adjacent pair whose result has the
  highest score, so every split of a normal piece into two normal pieces is a merge,
  ranked by the joined piece's score (ties: lower id first)."""
  normal = {p.piece: (-p.score, i) for i, p in enumerate(model.pieces) if p.type == _NORMAL}
  ranked = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items()
                  for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
  return [[left, right] for _, left, right in ranked]
