"""Tokenizer files of the export (export/tokenizer.py): transformers' AutoTokenizer
encodes text to exactly ul2x's ids, reserved tokens included, and decodes them back."""

import os
import re

import pytest
import seqio
from sentencepiece import sentencepiece_model_pb2

transformers = pytest.importorskip("transformers")

from ul2x.export import files  # noqa: E402
from ul2x.export.mappings import LLAMA_TOKENS, T5_TOKENS  # noqa: E402
from ul2x.export.tokenizer import write_tokenizer  # noqa: E402
from ul2x.tasks import corpus, vocabularies  # noqa: E402
from ul2x.tasks.train_vocab import train_vocab  # noqa: E402

# Texts as pieces: a reserved token stands alone, ul2x inserts it by id.
CASES = [
    ("[S2S]", " some text"),
    ("<extra_id_0>",),
    ("<extra_id_5>",),
    ("Translate to English:", "[S2S]", " Grüße aus Köln!"),
    ("The answer is", "[NLG]", " forty-two."),
    ("spans ", "<extra_id_0>", " and", "<extra_id_5>", " more"),
    ("[NLU]", "<extra_id_1>"),
]
NON_ASCII = [("naïve café, 日本語 🙂 — ∑",), ("[NLU]", " Привет, мир.")]
SENTINEL = re.compile(r"<extra_id_(\d+)>")
NUM_SP_SENTINELS = 8


def _ul2x_ids(vocab: seqio.Vocabulary, pieces: tuple) -> list[int]:
  """ul2x's ids of `pieces`: paradigm tokens and sentinels by id, the rest by
  `vocab.encode`, then EOS 1."""
  ids = []
  for piece in pieces:
    if piece in vocabularies.PARADIGM_TOKENS:
      ids.append(vocabularies.paradigm_token_id(vocab, piece))
    elif match := SENTINEL.fullmatch(piece):
      ids.append(vocabularies.sentinel_id(vocab, int(match[1])))
    else:
      ids += vocab.encode(piece)
  return ids + [1]


def _sentencepiece_text(text: str) -> str:
  """SentencePiece drops the trailing spaces of the text before a reserved token, so
  that space has no id and does not come back."""
  return re.sub(r" +(?=\[NLU\]|\[NLG\]|\[S2S\]|<extra_id_)", "", text)


def _export_dir(path, vocab, model_type: str, decoder_only: bool = False) -> str:
  """A directory as the export leaves it: the model's config.json and the tokenizer."""
  os.makedirs(path)
  files.write_json(os.path.join(path, "config.json"), {"model_type": model_type})
  write_tokenizer(str(path), vocab, decoder_only=decoder_only)
  return str(path)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> dict[str, seqio.SentencePieceVocabulary]:
  """{model type: a tiny vocabulary trained by train_vocab on the embedded corpus}."""
  vocabs = {}
  for kind in ("unigram", "bpe"):
    prefix = str(tmp_path_factory.mktemp(kind) / "spm")
    train_vocab(prefix, 400, model_type=kind)
    vocabs[kind] = vocabularies.sentencepiece_vocabulary(prefix + ".model", NUM_SP_SENTINELS)
  return vocabs


def _check_reserved_and_specials(tokenizer, vocab) -> None:
  for token in vocabularies.PARADIGM_TOKENS:
    assert tokenizer.convert_tokens_to_ids(token) == vocabularies.paradigm_token_id(vocab, token)
  count = vocabularies.num_sentinels_of(vocab)
  assert tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(count)]) == [
      vocabularies.sentinel_id(vocab, i) for i in range(count)]
  assert tokenizer.convert_tokens_to_ids(f"<extra_id_{count}>") in (None, tokenizer.unk_token_id)
  # generation_config.json (export/mappings.py) uses the same ids.
  assert tokenizer.pad_token_id == T5_TOKENS["pad_token_id"] == LLAMA_TOKENS["pad_token_id"] == 0
  assert tokenizer.eos_token_id == T5_TOKENS["eos_token_id"] == LLAMA_TOKENS["eos_token_id"] == 1
  assert T5_TOKENS["decoder_start_token_id"] == tokenizer.pad_token_id


@pytest.mark.parametrize("model_type", ["t5", "llama"])
def test_byte_vocabulary(tmp_path, model_type):
  vocab = vocabularies.byte_vocabulary()
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      _export_dir(tmp_path / "export", vocab, model_type))
  assert type(tokenizer).__name__ == "ByT5Tokenizer"
  _check_reserved_and_specials(tokenizer, vocab)
  for pieces in CASES + NON_ASCII:
    text = "".join(pieces)
    ids = tokenizer(text, split_special_tokens=False).input_ids  # reserved tokens parsed
    assert ids == _ul2x_ids(vocab, pieces), text
    assert tokenizer.decode(ids, skip_special_tokens=False) == text + "</s>"
    assert vocabularies.decode_with_reserved(vocab, ids) == text + "</s>"


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
@pytest.mark.parametrize("model_type", ["t5", "llama"])
def test_sentencepiece_vocabulary(tmp_path, sentencepiece, kind, model_type):
  vocab = sentencepiece[kind]
  directory = _export_dir(tmp_path / "export", vocab, model_type)
  assert sorted(os.listdir(directory)) == [
      "config.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  _check_reserved_and_specials(tokenizer, vocab)
  for pieces in CASES:
    text = "".join(pieces)
    ids = tokenizer(text, split_special_tokens=False).input_ids  # reserved tokens parsed
    assert ids == _ul2x_ids(vocab, pieces), text
    assert tokenizer.decode(ids, skip_special_tokens=False) == _sentencepiece_text(text) + "</s>"
  with open(os.path.join(directory, "spiece.model"), "rb") as exported, \
       open(vocab.sentencepiece_model_file, "rb") as trained:
    assert exported.read() == trained.read()


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_sentencepiece_plain_text(tmp_path, sentencepiece, kind):
  """Normalization, whitespace and segmentation as SentencePiece's, on held-out paragraphs
  and odd text: bytes for unseen characters, "<0x41>" spelled out, not the byte piece."""
  vocab = sentencepiece[kind]
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      _export_dir(tmp_path / "export", vocab, "t5"))
  extra = ["naïve café, 日本語 🙂", "  two  spaces  ", "tab\tand\nnewline", "ＡＢＣ ﬁ",
           "<0x41> ▁x", ""]
  for text in corpus.corpus_lines("validation") + extra:
    ids = tokenizer(text).input_ids
    assert ids == list(vocab.encode(text)) + [1], text
    assert tokenizer.decode(ids, skip_special_tokens=True) == vocab.decode(ids[:-1]), text


def test_refuses_other_vocabularies(tmp_path, sentencepiece):
  with pytest.raises(ValueError, match="PassThroughVocabulary"):
    write_tokenizer(str(tmp_path), seqio.PassThroughVocabulary(size=16))
  with pytest.raises(ValueError, match="not a ul2x vocabulary"):
    write_tokenizer(str(tmp_path), seqio.ByteVocabulary())
  with open(sentencepiece["unigram"].sentencepiece_model_file, "rb") as f:
    model = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  model.pieces[1].piece = "<eos>"
  path = tmp_path / "renamed.model"
  path.write_bytes(model.SerializeToString())
  with pytest.raises(ValueError, match="<pad> <eos> <unk>, not ul2x's <pad> </s> <unk>"):
    write_tokenizer(str(tmp_path), vocabularies.sentencepiece_vocabulary(str(path)))


RESERVED_IN_TEXT = "Answer:[NLG] <extra_id_0> </s>x"


@pytest.mark.parametrize("decoder_only", [False, True])
def test_reserved_tokens_in_text_are_text_as_in_ul2x(tmp_path, decoder_only):
  """One rule: a literal [NLG] or <extra_id_0> in text is its bytes in infer's input
  files, the SavedModel and the exported tokenizer alike; an encoder-decoder's inputs end
  with EOS, a decoder-only prompt starts with 0 as infer's causal prompt does."""
  import tensorflow as tf

  from ul2x.export.serving_tf import encode_texts
  from ul2x.tasks import inference
  vocab = vocabularies.byte_vocabulary()
  tokenizer = transformers.AutoTokenizer.from_pretrained(_export_dir(
      tmp_path / "export", vocab, "llama" if decoder_only else "t5", decoder_only))
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(RESERVED_IN_TEXT + "\n")
  example, = inference.file_examples(str(prompts), task_feature_lengths={"inputs": 64},
                                     causal_prompt=decoder_only)
  ids = tokenizer(RESERVED_IN_TEXT).input_ids
  if decoder_only:
    assert ids == [0] + list(example["prompt"])
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1
  else:
    assert ids == list(example["inputs"])
    served = encode_texts(tf.constant([RESERVED_IN_TEXT]), inputs_len=64).numpy()[0]
    assert ids == [i for i in served if i]
  assert ids[1 if decoder_only else 0:][:7] == [b + 3 for b in b"Answer:"]
  assert len(ids) == len(RESERVED_IN_TEXT.encode()) + 1
  # Asked for, the tokenizer parses them, as the ids ul2x inserts.
  parsed = tokenizer(RESERVED_IN_TEXT, split_special_tokens=False).input_ids
  assert vocabularies.paradigm_token_id(vocab, "[NLG]") in parsed
  assert vocabularies.sentinel_id(vocab, 0) in parsed


def test_sentencepiece_reads_text_as_sentencepiece_does(tmp_path, sentencepiece):
  """The reserved tokens are user-defined pieces of a SentencePiece vocabulary ([NLU]
  [NLG] [S2S] in the model, the sentinels added by seqio), which it reads from text, so
  the tokenizer does too (the spaces beside them may take other pieces: docs/export.md);
  </s> and <pad> are text."""
  vocab = sentencepiece["unigram"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      _export_dir(tmp_path / "export", vocab, "t5"))
  assert tokenizer("</s> and <pad>").input_ids == list(vocab.encode("</s> and <pad>")) + [1]
  for token, reserved in (("[NLG]", vocabularies.paradigm_token_id(vocab, "[NLG]")),
                          ("<extra_id_0>", vocabularies.sentinel_id(vocab, 0))):
    text = f"spans {token} here"
    assert reserved in vocab.encode(text) and reserved in tokenizer(text).input_ids
