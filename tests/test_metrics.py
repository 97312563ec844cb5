"""Tests for ul2x.tasks.metrics: each metric against a value its library (or the SQuAD
script) documents or that is computed by hand."""

import pytest

from ul2x.tasks import metrics

# sacrebleu's README example: BLEU = 48.53, chrF2 = 59.73 (two reference streams).
SYSTEM = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]


def test_bleu_and_chrf_match_sacrebleus_documented_example():
  per_example = [list(refs) for refs in zip(*REFS)]
  assert metrics.bleu(per_example, SYSTEM)["bleu"] == pytest.approx(48.53, abs=0.005)
  assert metrics.chrf(per_example, SYSTEM)["chrf"] == pytest.approx(59.73, abs=0.005)
  assert metrics.bleu(["a b c d"], ["a b c d"]) == {"bleu": pytest.approx(100)}
  with pytest.raises(ValueError, match=r"different numbers of references \[1, 2\]"):
    metrics.bleu([["x"], ["y", "z"]], ["x", "y"])


def test_rouge_by_hand_and_sentence_split_for_rougelsum():
  # 3 of 6 target unigrams, precision 1: F = 2/3; 2 of 5 bigrams: F = 4/7.
  values = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
  assert values["rouge1"] == pytest.approx(200 / 3)
  assert values["rouge2"] == pytest.approx(400 / 7)
  # Sentences swapped: the summary-level LCS matches each sentence whole (100), where
  # one LCS over the whole text would find 3 of 6 tokens.
  values = metrics.rouge(["a b c . d e f"], ["d e f . a b c"])
  assert values["rougeLsum"] == pytest.approx(100)
  assert values["rouge1"] == pytest.approx(100)


def test_squad_normalizes_like_the_official_script():
  assert metrics.normalize_squad("The  Denver Broncos!") == "denver broncos"
  # 2 shared tokens: precision 2/3, recall 1 -> F1 0.8; the best of the answers counts.
  values = metrics.squad([["Denver Broncos", "Broncos"], "the Denver Broncos"],
                         ["Denver Broncos won", "denver broncos."])
  assert values == {"em": pytest.approx(50.0), "f1": pytest.approx(90.0)}


def test_classification_metrics():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
  # TP 1, FP 0, FN 1 -> F1 2/3; an unknown label (-1) counts as wrong.
  assert metrics.f1([1, 1, 0, 0], [1, -1, 0, 0])["f1"] == pytest.approx(200 / 3)
  # [[TN 1, FP 1], [FN 0, TP 2]]: (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1) = 1 / sqrt(3).
  mcc = metrics.matthews_corrcoef([0, 0, 1, 1], [0, 1, 1, 1])["matthews_corrcoef"]
  assert mcc == pytest.approx(100 / 3 ** 0.5)
  # per class F1: 1, 1/2 (TP 1, FP 1, FN 1), 0 -> mean 1/2.
  cb = metrics.mean_multiclass_f1(3)([0, 1, 1, 2], [0, 1, 2, 1])
  assert cb == {"mean_3class_f1": pytest.approx(50.0)}


def test_correlations_by_hand():
  assert metrics.pearson_corrcoef([1, 2, 3], [2, 4, 6])["pearson_corrcoef"] == pytest.approx(100)
  # x = [1, 2, 3], y = [1, 3, 2]: r = 1.5 / sqrt(2 * 2) = 0.5; ranks equal the values.
  assert metrics.pearson_corrcoef([1, 2, 3], [1, 3, 2])["pearson_corrcoef"] == pytest.approx(50)
  assert metrics.spearman_corrcoef([1, 2, 3], [1, 9, 4])["spearman_corrcoef"] == pytest.approx(50)
  with pytest.raises(ValueError, match="pearson_corrcoef needs numbers, got 'abc'"):
    metrics.pearson_corrcoef(["abc", "d"], [1.0, 2.0])


def test_metrics_by_name_and_bad_inputs():
  assert metrics.metric_fns(["bleu", "rouge", "squad"]) == [
      metrics.bleu, metrics.rouge, metrics.squad]
  with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleurt'\]; known: \["):
    metrics.metric_fns(["bleurt"])
  with pytest.raises(ValueError, match="accuracy got 2 targets but 1 predictions"):
    metrics.accuracy([1, 2], [1])
  with pytest.raises(ValueError, match="chrf got no targets"):
    metrics.chrf([], [])
