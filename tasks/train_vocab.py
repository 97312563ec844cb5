"""Trains a SentencePiece vocabulary locally, with the UL2 paradigm tokens reserved in it.

  python -m ul2x.tasks.train_vocab --model_prefix=/tmp/spm --vocab_size=2000 \\
      [--input=my_corpus.txt ...]

Input files hold one document or paragraph per line (UTF-8); without `--input` the
embedded corpus's train split is used. Writes `PREFIX.model` and `PREFIX.vocab`:
SentencePiece ids 0 pad, 1 eos, 2 unk (no bos), the learned pieces (with byte fallback,
so any text encodes), and last the user-defined pieces `[NLU] [NLG] [S2S]`.
`vocabularies.sentencepiece_vocabulary(PREFIX + '.model', num_sentinels)` loads it and
appends the sentinels (`NUM_SENTINELS` = 122 by default). Nothing is downloaded.
"""

import argparse
import os
import sys
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from ul2x.tasks import corpus
from ul2x.tasks.vocabularies import NUM_SENTINELS, PARADIGM_TOKENS


def _append_paradigm_pieces(model_file: str) -> None:
  """Appends the paradigm tokens as user-defined pieces: each always encodes to one id."""
  model = sentencepiece_model_pb2.ModelProto()
  with open(model_file, "rb") as f:
    model.ParseFromString(f.read())
  for token in PARADIGM_TOKENS:
    model.pieces.add(piece=token, score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  with open(model_file, "wb") as f:
    f.write(model.SerializeToString())
  vocab_file = model_file[:-len(".model")] + ".vocab"
  if os.path.exists(vocab_file):
    with open(vocab_file, "a", encoding="utf-8") as f:
      f.writelines(f"{token}\t0\n" for token in PARADIGM_TOKENS)


def train_vocab(model_prefix: str, vocab_size: int, inputs: list[str] | None = None,
                model_type: str = "unigram") -> int:
  """Trains `model_prefix.model` with `vocab_size` pieces (specials and byte pieces
  included), then the 3 paradigm-token pieces. Returns `vocab_size + 3`."""
  inputs = list(inputs or [])
  for path in inputs:
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
      raise ValueError(f"--input {path!r} is missing or empty; pass text files with one "
                       "document per line.")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    if not inputs:
      inputs = [os.path.join(tmp, "corpus_train.txt")]
      with open(inputs[0], "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in corpus.corpus_lines("train"))
    try:
      spm.SentencePieceTrainer.train(
          input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size,
          model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
          byte_fallback=True, character_coverage=1.0, input_sentence_size=1_000_000,
          shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training failed: {' '.join(str(e).split())}; "
                       "check --input and --vocab_size.") from e
  _append_paradigm_pieces(model_prefix + ".model")
  return vocab_size + len(PARADIGM_TOKENS)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
  parser.add_argument("--vocab_size", type=int, default=2000,
                      help="learned pieces incl. pad/eos/unk and 256 byte pieces")
  parser.add_argument("--input", action="append", default=[],
                      help="text file, one document per line (repeatable); default: the "
                           "embedded corpus's train split")
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  parser.add_argument("--num_sentinels", type=int, default=NUM_SENTINELS,
                      help="sentinels you will load it with (only for the size printed)")
  args = parser.parse_args(argv)
  try:
    pieces = train_vocab(args.model_prefix, args.vocab_size, args.input, args.model_type)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  total = pieces + args.num_sentinels
  padded = -(-total // 128) * 128
  print(f"wrote {args.model_prefix}.model: {args.vocab_size} pieces + "
        f"{len(PARADIGM_TOKENS)} paradigm tokens; with {args.num_sentinels} sentinels "
        f"{total} ids: load it with sentencepiece_vocabulary('{args.model_prefix}.model', "
        f"{args.num_sentinels}) and set TransformerConfig.vocab_size = {padded} "
        "(a multiple of 128).")


if __name__ == "__main__":
  main(sys.argv[1:])
