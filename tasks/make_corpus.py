"""Builds the embedded default corpus `tasks/data/corpus.txt.gz` from CPython's docs.

Source: `pydoc_data.topics.topics`, the plain-text rendering of the Python
Language Reference that ships with every CPython (the text `help("assert")`
prints). Licence: Python Software Foundation License; the documentation is
Copyright (c) Python Software Foundation.

Each topic is split at blank lines into paragraphs; whitespace inside a
paragraph is collapsed to single spaces; headings, grammar rules, interactive
sessions, tables, code and paragraphs shorter than `MIN_CHARS` are dropped, as
are repeats. The result is one paragraph per line, UTF-8, gzipped with mtime=0,
so the same CPython version always gives byte-identical output. Other CPython
versions ship other text: the committed file, not this script, is the corpus.

Run: `python -m ul2x.tasks.make_corpus` (writes `CORPUS_PATH`, prints a summary).
"""

import gzip
import re

from pydoc_data import topics

from ul2x.tasks.corpus import CORPUS_PATH

MIN_CHARS = 40
# Markers of non-prose blocks: doctest prompts, grammar rules, table and heading rules.
_CODE_MARKERS = (">>>", "::=", "+---", "====", "****", "----")
_MIN_LETTER_FRACTION = 0.75


def is_prose(block: str) -> bool:
  """Whether a blank-line-separated block of the docs is an English paragraph."""
  text = " ".join(block.split())
  if len(text) < MIN_CHARS or any(m in block for m in _CODE_MARKERS):
    return False
  # Column-aligned text (code with comments, tables) has runs of 3+ spaces mid-line.
  if re.search(r"\S {3,}\S", block):
    return False
  if not re.search(r"[.?!:][)\"”]?$", text):
    return False
  letters = sum(c.isalpha() for c in text)
  return letters >= _MIN_LETTER_FRACTION * sum(not c.isspace() for c in text)


def corpus_paragraphs() -> list[str]:
  """The corpus: prose paragraphs of all topics (sorted by topic), whitespace collapsed."""
  paragraphs, seen = [], set()
  for name in sorted(topics.topics):
    for block in re.split(r"\n\s*\n", topics.topics[name]):
      text = " ".join(block.split())
      if is_prose(block) and text not in seen:
        seen.add(text)
        paragraphs.append(text)
  return paragraphs


def main() -> None:
  paragraphs = corpus_paragraphs()
  data = "".join(p + "\n" for p in paragraphs).encode("utf-8")
  CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
  with open(CORPUS_PATH, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
      f.write(data)
  print(f"wrote {CORPUS_PATH}: {len(paragraphs)} paragraphs, "
        f"{len(data)} bytes uncompressed, {CORPUS_PATH.stat().st_size} gzipped")


if __name__ == "__main__":
  main()
