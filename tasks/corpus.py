"""The embedded default corpus: English paragraphs from CPython's language reference.

`data/corpus.txt.gz` is committed in the repository, one paragraph per line,
built by `python -m ul2x.tasks.make_corpus` from `pydoc_data.topics` (Python
Software Foundation License). It needs no download and is the same on every
machine.
"""

import functools
import gzip
import pathlib

CORPUS_PATH = pathlib.Path(__file__).parent / "data" / "corpus.txt.gz"
SPLITS = ("train", "validation")
# Every VALIDATION_EVERY-th paragraph (0-based index % VALIDATION_EVERY == 0) is held out.
VALIDATION_EVERY = 20


@functools.cache
def _all_lines() -> tuple[str, ...]:
  if not CORPUS_PATH.exists():
    raise FileNotFoundError(
        f"embedded corpus {CORPUS_PATH} is missing; regenerate it with "
        "`python -m ul2x.tasks.make_corpus`.")
  with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
    return tuple(line for line in f.read().split("\n") if line)


def corpus_lines(split: str) -> list[str]:
  """Paragraphs of `split` ('train' or 'validation'), in file order; deterministic."""
  if split not in SPLITS:
    raise ValueError(f"corpus split {split!r} does not exist; use one of {SPLITS}.")
  held_out = split == "validation"
  return [line for i, line in enumerate(_all_lines())
          if (i % VALIDATION_EVERY == 0) == held_out]
