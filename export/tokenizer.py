"""Tokenizer files for an exported model: ul2x's vocabularies written so that
`transformers.AutoTokenizer.from_pretrained(export_dir)` encodes text to ul2x's ids.

The paradigm tokens `[NLU] [NLG] [S2S]` and the sentinels `<extra_id_i>` (seqio's
spelling) are added tokens at ul2x's ids (tasks/vocabularies.py). Text is encoded as
ul2x encodes it (infer's input files, the SavedModel): `tokenizer(text)` does not parse
special tokens in text (`split_special_tokens`), so a literal `[NLG]` is its bytes, as
in ul2x; with SentencePiece, whose user-defined pieces the reserved tokens are,
ul2x (seqio) reads them from text, and so does the tokenizer.
`tokenizer(text, split_special_tokens=False)` parses them, as the ids ul2x inserts.
An encoder-decoder's inputs end with EOS (1), as T5 tokenizers do; a
decoder-only model's prompt starts with 0 and has no EOS, as infer lays out a causal
prompt. Pad is 0.

- Byte vocabulary: `ByT5Tokenizer` (bytes + 3), its added tokens pinned to our ids; for
  a decoder-only model a `tokenizer.json` of the same ids (bytes, then + 3), since
  ByT5Tokenizer always appends EOS.
- SentencePiece: `spiece.model` (the model as trained) and a `tokenizer.json` built from
  it for the `tokenizers` backend, with SentencePiece's normalizer, byte fallback and
  whitespace handling; transformers' T5Tokenizer would rebuild its own pipeline without
  byte fallback and so encode rare text differently.

The files are written directly (JSON and the copied model): exporting needs neither
transformers nor tokenizers.
"""

import base64
import os
import shutil

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


def write_tokenizer(directory: str, vocabulary, *, decoder_only: bool = False) -> None:
  """Writes the transformers tokenizer files for `vocabulary` (a seqio.ByteVocabulary as
  tasks.vocabularies.byte_vocabulary() makes it, or a seqio.SentencePieceVocabulary from
  tasks.vocabularies.sentencepiece_vocabulary) into `directory` (which exists);
  `decoder_only`: prompts as infer's causal prompts (0 first, no EOS)."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    _write_byte(directory, vocabulary, decoder_only)
  elif isinstance(vocabulary, seqio.SentencePieceVocabulary):
    _write_sentencepiece(directory, vocabulary, decoder_only)
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


def _added_token(content: str, special: bool = True) -> dict:
  # Matched on the raw text with its neighbours' spaces kept: ul2x encodes the text on
  # either side of a reserved token as it stands. Special ones are matched only when
  # asked (split_special_tokens=False); the others always.
  return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": special}


def _config(tokenizer_class: str, special: list[str], decoder_only: bool, **extra) -> dict:
  # A decoder-only prompt starts with 0 (<pad>), as seqio shifts the targets right.
  bos = {"bos_token": _SPECIALS["pad_token"]} if decoder_only else {}
  return {"tokenizer_class": tokenizer_class, **_SPECIALS, **bos,
          "additional_special_tokens": special,
          # Special tokens in text are text, as ul2x encodes it (module docstring).
          "split_special_tokens": True,
          # transformers' clean-up would drop spaces before punctuation when decoding.
          "clean_up_tokenization_spaces": False, **extra}


def _post_processor(decoder_only: bool) -> dict:
  """EOS after an encoder-decoder's inputs; 0 before a decoder-only prompt, no EOS."""
  name = "<pad>" if decoder_only else "</s>"
  token = {"SpecialToken": {"id": name, "type_id": 0}}
  a, b = ({"Sequence": {"id": key, "type_id": 0}} for key in "AB")
  single, pair = ([token, a], [token, a, b]) if decoder_only else ([a, token], [a, token, b, token])
  return {"type": "TemplateProcessing", "single": single, "pair": pair,
          "special_tokens": {name: {"id": name, "ids": [0 if decoder_only else 1],
                                    "tokens": [name]}}}


def _write_byte(directory: str, vocabulary: seqio.ByteVocabulary, decoder_only: bool) -> None:
  """ByT5Tokenizer numbers bytes as we do; its own extra ids would put <extra_id_0> at
  259, so extra_ids=0 and our reserved tokens pinned by id instead. It always appends
  EOS, so a decoder-only model gets a tokenizer.json: each byte as GPT-2's byte-level
  character, one token each (no merges), at byte + 3."""
  reserved = _reserved_tokens(vocabulary)
  if not decoder_only:
    decoder = {str(i): _added_token(token) for i, token in reserved.items()}
    config = _config("ByT5Tokenizer", list(reserved.values()), False, extra_ids=0,
                     added_tokens_decoder=decoder)
    files.write_json(os.path.join(directory, CONFIG), config)
    return
  tokens = dict(enumerate(_SPECIALS.values())) | reserved
  vocab = {token: i for i, token in tokens.items()}
  vocab |= {char: byte + 3 for byte, char in enumerate(_byte_level_chars())}
  files.write_json(os.path.join(directory, TOKENIZER_JSON), {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, **_added_token(token)} for i, token in tokens.items()],
      "normalizer": None,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                        "trim_offsets": False, "use_regex": False},
      "post_processor": _post_processor(True),
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False},
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": vocab, "merges": []}})
  files.write_json(os.path.join(directory, CONFIG),
                   _config("PreTrainedTokenizerFast", list(reserved.values()), True))


def _byte_level_chars() -> list[str]:
  """The character GPT-2's byte-level pre-tokenizer (`tokenizers`' ByteLevel) maps each
  byte 0..255 to: printable Latin-1 bytes as themselves, the others from U+0100 on."""
  kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  chars, extra = [], 0
  for byte in range(256):
    if byte in kept:
      chars.append(chr(byte))
    else:
      chars.append(chr(0x100 + extra))
      extra += 1
  return chars


def copy_tokenizer(directory: str, source: str) -> None:
  """Copies an import's Hugging Face tokenizer files (trainer/record.py) into `directory`."""
  for name in sorted(os.listdir(source)):
    shutil.copy(os.path.join(source, name), os.path.join(directory, name))


def _write_sentencepiece(directory: str, vocabulary: seqio.SentencePieceVocabulary,
                         decoder_only: bool) -> None:
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
  files.write_json(os.path.join(directory, TOKENIZER_JSON),
                   _tokenizer_json(model, reserved, decoder_only))
  files.write_json(os.path.join(directory, CONFIG),
                   _config("PreTrainedTokenizerFast", [], decoder_only))


def _tokenizer_json(model: sentencepiece_model_pb2.ModelProto, reserved: dict[int, str],
                    decoder_only: bool) -> dict:
  """The `tokenizers` serialization of `model` plus the sentinels: each text chunk between
  reserved tokens is normalized, prefixed and segmented as SentencePiece does it. The
  reserved tokens are user-defined pieces (the paradigm tokens in the model, the
  sentinels added by seqio), which SentencePiece reads from text: not special, so they
  are split out of text, as ul2x's encode does."""
  tokens = dict(enumerate(_SPECIALS.values())) | reserved
  added = [{"id": i, **_added_token(token, i < len(_SPECIALS))} for i, token in tokens.items()]
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
      "normalizer": _normalizer(model.normalizer_spec), "pre_tokenizer": None,
      "post_processor": _post_processor(decoder_only),
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
