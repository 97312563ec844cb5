"""Evaluation of decoded text: the tasks' seqio postprocessor and metric functions.

seqio's contract: a task's `postprocess_fn(text, example=..., is_target=...)` maps each
decoded target and prediction, then each metric function `fn(targets, predictions)`
returns `{metric name: value}`. (BLEU and ROUGE would need `sacrebleu` and
`rouge_score`, which the environment does not install.)
"""

from collections.abc import Mapping, Sequence
from typing import Any


def as_text(output: str | bytes, example: Mapping[str, Any] | None = None,
            is_target: bool = False) -> str:
  """Postprocessor: decoded text (bytes as UTF-8) without surrounding whitespace."""
  del example, is_target  # targets and predictions are treated alike
  if isinstance(output, bytes):
    output = output.decode("utf-8")
  return output.strip()


def exact_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """{'exact_match': percent (0..100) of predictions equal to their target}."""
  if len(targets) != len(predictions):
    raise ValueError(f"exact_match got {len(targets)} targets but {len(predictions)} "
                     "predictions; pass one prediction per target.")
  if not targets:
    raise ValueError("exact_match got no targets; evaluate at least one example.")
  matches = sum(t == p for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * matches / len(targets)}


METRICS = {"exact_match": exact_match}


def metric_fns(names: Sequence[str]) -> list:
  """The metric functions named `names` (keys of `METRICS`)."""
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}. Pass known "
                     "names, or register the task with its own metric_fns.")
  return [METRICS[n] for n in names]
