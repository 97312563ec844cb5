"""Evaluation of decoded text: the tasks' seqio postprocessors and metric functions.

seqio's contract: a task's `postprocess_fn(text, example=..., is_target=...)` maps each
decoded target and prediction, then each metric function `fn(targets, predictions)`
returns `{metric name: value}`. Values are percentages (0..100) as in T5. Each metric
is its library's: BLEU and chrF from `sacrebleu`, ROUGE from `rouge-score`, accuracy,
F1 and Matthews correlation from scikit-learn, Pearson and Spearman from scipy. Only
SQuAD's answer normalisation and token F1 are written here: the official SQuAD
script is not a package, and these are its few lines, as T5's `qa_utils` has them.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
import re
import string
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
import sacrebleu
import scipy.stats
import sklearn.metrics


def as_text(output: str | bytes, example: Mapping[str, Any] | None = None,
            is_target: bool = False) -> str:
  """Postprocessor: decoded text (bytes as UTF-8) without surrounding whitespace."""
  del example, is_target  # targets and predictions are treated alike
  if isinstance(output, bytes):
    output = output.decode("utf-8")
  return output.strip()


def _check(name: str, targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{name} got {len(targets)} targets but {len(predictions)} "
                     "predictions; pass one prediction per target.")
  if not targets:
    raise ValueError(f"{name} got no targets; evaluate at least one example.")


def _numbers(name: str, values: Sequence[Any]) -> np.ndarray:
  """`values` as float64, or one line naming the first value that is not a number."""
  for value in values:
    if not isinstance(value, (int, float, np.number)):
      raise ValueError(f"{name} needs numbers, got {value!r}; use it on a task whose "
                       "postprocess_fn returns numbers (e.g. glue_stsb, glue_cola).")
  return np.asarray(values, np.float64)


def exact_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """{'exact_match': percent of predictions equal to their target}."""
  _check("exact_match", targets, predictions)
  matches = sum(t == p for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * matches / len(targets)}


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """{'accuracy': percent of predictions equal to their target} (scikit-learn)."""
  _check("accuracy", targets, predictions)
  return {"accuracy": 100 * sklearn.metrics.accuracy_score(targets, predictions)}


def f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'f1': binary F1 of class 1} (scikit-learn); a prediction that is neither 0 nor 1
  (an unknown label, postprocessed to -1) counts as wrong, as in T5."""
  _check("f1", targets, predictions)
  targets, predictions = np.asarray(targets), np.array(predictions)
  invalid = (predictions != 0) & (predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {"f1": 100 * sklearn.metrics.f1_score(targets, predictions)}


def mean_multiclass_f1(num_classes: int):
  """A metric function: {'mean_<n>class_f1': F1 averaged over classes 0..n-1} (scikit-learn)."""
  name = f"mean_{num_classes}class_f1"

  def metric(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    _check(name, targets, predictions)
    return {name: 100 * sklearn.metrics.f1_score(
        targets, predictions, labels=range(num_classes), average="macro")}
  return metric


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """{'matthews_corrcoef': 100 * Matthews correlation} (scikit-learn)."""
  _check("matthews_corrcoef", targets, predictions)
  return {"matthews_corrcoef": 100 * sklearn.metrics.matthews_corrcoef(targets, predictions)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """{'pearson_corrcoef': 100 * Pearson's r} (scipy)."""
  _check("pearson_corrcoef", targets, predictions)
  r = scipy.stats.pearsonr(_numbers("pearson_corrcoef", targets),
                           _numbers("pearson_corrcoef", predictions))[0]
  return {"pearson_corrcoef": 100 * float(r)}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  """{'spearman_corrcoef': 100 * Spearman's rho} (scipy)."""
  _check("spearman_corrcoef", targets, predictions)
  rho = scipy.stats.spearmanr(_numbers("spearman_corrcoef", targets),
                              _numbers("spearman_corrcoef", predictions))[0]
  return {"spearman_corrcoef": 100 * float(rho)}


def _references(name: str, targets: Sequence[str | Sequence[str]]) -> list[list[str]]:
  """sacrebleu's reference streams: one list per reference, each a text per example."""
  if all(isinstance(t, str) for t in targets):
    return [list(targets)]
  counts = {len(t) for t in targets if not isinstance(t, str)}
  if len(counts) != 1 or any(isinstance(t, str) for t in targets):
    raise ValueError(f"{name} got targets with different numbers of references {sorted(counts)};"
                     " give every example the same number of reference texts.")
  return [list(refs) for refs in zip(*targets)]


def bleu(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{'bleu': corpus BLEU} with sacrebleu's defaults (13a tokenisation; T5 used 'intl').
  A target is a text or a list of reference texts (the same number per example)."""
  _check("bleu", targets, predictions)
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), _references("bleu", targets)).score}


def chrf(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{'chrf': corpus chrF} (sacrebleu's defaults: chrF2, character 6-grams)."""
  _check("chrf", targets, predictions)
  return {"chrf": sacrebleu.corpus_chrf(list(predictions), _references("chrf", targets)).score}


ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """{'rouge1', 'rouge2', 'rougeLsum': mean F-measure} (rouge-score, its default
  tokeniser with Porter stemming off, as T5). rougeLsum reads one sentence per line:
  T5's rule ' . ' -> ' .\\n' splits sentences (no nltk model needed)."""
  _check("rouge", targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS))
  scores = [scorer.score(target=t.replace(" . ", " .\n"), prediction=p.replace(" . ", " .\n"))
            for t, p in zip(targets, predictions)]
  return {key: 100 * float(np.mean([s[key].fmeasure for s in scores])) for key in ROUGE_KEYS}


def normalize_squad(answer: str) -> str:
  """The official SQuAD v1.1 script's normalisation: lower case, no punctuation, no
  articles, single spaces."""
  answer = "".join(c for c in answer.lower() if c not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", answer).split())


def _token_f1(target: str, prediction: str) -> float:
  common = Counter(target.split()) & Counter(prediction.split())
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(prediction.split()), same / len(target.split())
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{'em', 'f1'}: SQuAD exact match and token F1 of normalised answers, each the best
  over the example's answers (a target is an answer or a list of answers)."""
  _check("squad", targets, predictions)
  em, f1_sum = 0.0, 0.0
  for answers, prediction in zip(targets, predictions):
    answers = [normalize_squad(a) for a in ([answers] if isinstance(answers, str) else answers)]
    prediction = normalize_squad(prediction)
    em += max(a == prediction for a in answers)
    f1_sum += max(_token_f1(a, prediction) for a in answers)
  return {"em": 100 * em / len(targets), "f1": 100 * f1_sum / len(targets)}


METRICS = {fn.__name__: fn for fn in (
    exact_match, accuracy, f1, matthews_corrcoef, pearson_corrcoef, spearman_corrcoef,
    bleu, chrf, rouge, squad)}


def metric_fns(names: Sequence[str]) -> list:
  """The metric functions named `names` (keys of `METRICS`)."""
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}. Pass known "
                     "names, or register the task with its own metric_fns.")
  return [METRICS[n] for n in names]
