"""Tests for ul2x.tasks.glue: T5's formatting on the examples T5 publishes (its
preprocessors tests and paper), every registered task on TFDS's mock data with its
postprocessor and metrics, the one-line error for a dataset not built, and fine-tuning
then evaluating through the command line."""

import json
import math

import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from cli_utils import one_line_error, run_job

import ul2x.tasks  # noqa: F401  registers the tasks
from ul2x.tasks import glue, inference, metrics

LENGTHS = {"inputs": 256, "targets": 32}
MODEL = "--gin_file=gin_configs/models/tiny.gin"


def _texts(dataset: tf.data.Dataset) -> list[dict]:
  return [{k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()}
          for ex in dataset.as_numpy_iterator()]


def _one(fn, **example) -> dict:
  (ex,) = _texts(fn(tf.data.Dataset.from_tensors(example)))
  return ex


def _glue(name: str, benchmark: str = "glue"):
  """T5's GLUE formatting of dataset `name` of `benchmark` ('glue' or 'super_glue')."""
  labels = (glue.GLUE_LABELS if benchmark == "glue" else glue.SUPER_GLUE_LABELS)[name]
  return lambda ds: glue.glue_text(ds, benchmark=name, label_names=labels)


def test_formatting_matches_t5s_published_examples():
  qqp = _glue("qqp")
  question = {"q1": "How so?", "q2": "Why not?", "q3": "Who?", "idx": 10}
  assert _one(qqp, **question, label=0) == {
      "inputs": "qqp q1: How so? q2: Why not? q3: Who?", "targets": "not_duplicate"}
  assert _one(qqp, **question, label=-1)["targets"] == "<unk>"
  sst2 = _one(_glue("sst2"), idx=0, label=0, sentence=(
      "it confuses the mere flashing of kinky soft-core imagery with naughty fun ."))
  assert sst2 == {"inputs": "sst2 sentence: it confuses the mere flashing of kinky soft-core "
                  "imagery with naughty fun .", "targets": "negative"}
  # T5's example, its keys sorted as T5 sorts them.
  mnli = _one(_glue("mnli"), idx=0, label=0, premise="I hate pigeons.",
              hypothesis="My feelings towards pigeons are filled with animosity.")
  assert mnli == {"inputs": "mnli hypothesis: My feelings towards pigeons are filled with "
                  "animosity. premise: I hate pigeons.", "targets": "entailment"}
  multirc = _one(_glue("multirc", "super_glue"), label=1, paragraph=(
      "<b>Sent 1: </b>Once upon a time, there was a squirrel named Joey.<br><b>Sent 2: </b>"
      "Joey loved to go outside and play with his cousin Jimmy."),
      question="Why was Joey surprised the morning he woke up for breakfast?",
      answer="There was only pie to eat", idx={"paragraph": 5, "question": 1, "answer": 3})
  assert multirc == {
      "inputs": "multirc question: Why was Joey surprised the morning he woke up for "
                "breakfast? answer: There was only pie to eat paragraph: Sent 1: Once upon a "
                "time, there was a squirrel named Joey. Sent 2: Joey loved to go outside and "
                "play with his cousin Jimmy.",
      "targets": "True", "idx/paragraph": 5, "idx/question": 1, "idx/answer": 3}
  # The T5 paper's Figure 1.
  assert _one(glue.stsb_text, sentence1="The rhino grazed on the grass.", label=3.8, idx=0,
              sentence2="A rhino is grazing in a field.") == {
      "inputs": "stsb sentence1: The rhino grazed on the grass. sentence2: A rhino is "
                "grazing in a field.", "targets": "3.8"}
  for score, text in ((2.8, "2.8"), (1.66, "1.6")):
    assert _one(glue.stsb_text, sentence1="Big news.", sentence2="No idea.", label=score,
                idx=10) == {"inputs": "stsb sentence1: Big news. sentence2: No idea.",
                            "targets": text}
  assert _one(glue.wsc_text, text="This is a test sentence .", span1_text="test",
              span1_index=3, span2_text="This", span2_index=0, label=0, idx=0) == {
      "inputs": "wsc text: # This # is a * test * sentence .", "targets": "False"}
  record = _texts(glue.record_text(tf.data.Dataset.from_tensors({
      "query": "It was @placeholder.", "entities": ["A", "B", "C"],
      "passage": "This is the passage\n@highlight\nAnother sentence.\n@highlight\nThird sentence.",
      "answers": ["A", "C"], "idx": {"passage": 1, "query": 2}})))
  inputs = ("record query: It was @placeholder. entities: A, B, C passage: This is the "
            "passage. Another sentence. Third sentence.")
  assert [(r["inputs"], r["targets"], r["idx/passage"], r["idx/query"]) for r in record] == [
      (inputs, "A", 1, 2), (inputs, "C", 1, 2)]
  assert [a.decode() for a in record[0]["answers"]] == ["A", "C"]


def _mock_examples(examples: dict[str, list[dict]]):
  """mock_data's `as_dataset_fn` serving `examples[<TFDS config name>]`."""
  def as_dataset(builder, split, **kwargs) -> tf.data.Dataset:
    del split, kwargs
    rows = examples[builder.builder_config.name]
    return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})
  return as_dataset


def test_diagnostics_are_formatted_as_the_benchmark_whose_model_predicts_them():
  # The first example of each diagnostic (GLUE's diagnostic.tsv, which has no labels;
  # SuperGLUE's AX-b.jsonl and AX-g.jsonl) as TFDS reads it; expected: what T5's
  # glue_utils.get_glue_text_preprocessor makes of it (ax as mnli, axb and axg as rte, axb's
  # sentence1/sentence2 first renamed premise/hypothesis by the rekey in T5's tasks.py).
  cat = {"premise": "The cat sat on the mat.", "hypothesis": "The cat did not sit on the mat."}
  examples = {
      "ax": [{**cat, "label": -1, "idx": 0}],
      "axb": [{"sentence1": cat["premise"], "sentence2": cat["hypothesis"], "label": 1,
               "idx": 0}],
      "axg": [{"premise": "The taxpayer met with the accountant to get help filing his taxes.",
               "hypothesis": "The accountant sought help filing taxes.", "label": 1, "idx": 0}]}
  expected = {
      "glue_ax": ("mnli hypothesis: The cat did not sit on the mat. premise: The cat sat on the "
                  "mat.", "<unk>"),
      "super_glue_axb": ("rte hypothesis: The cat did not sit on the mat. premise: The cat sat "
                         "on the mat.", "not_entailment"),
      "super_glue_axg": ("rte hypothesis: The accountant sought help filing taxes. premise: The "
                         "taxpayer met with the accountant to get help filing his taxes.",
                         "not_entailment")}
  with tfds.testing.mock_data(as_dataset_fn=_mock_examples(examples)):
    for name, (inputs, targets) in expected.items():
      assert set(seqio.get_mixture_or_task(name).splits) == {"test"}, name
      (ex,) = inference.task_examples(name, "test", LENGTHS)
      assert (ex["inputs_pretokenized"], ex["targets_pretokenized"]) == (inputs, targets)


# T5's preprocessors_test.test_wsc_simple, and its hand-blanked text (a wrong span2_index).
WSC = [{"text": "Mitchell asked Tom if he could lend some money.", "span1_text": text,
        "span1_index": index, "span2_text": "he", "span2_index": 4, "label": label, "idx": idx}
       for idx, (text, index, label) in enumerate((("Tom", 2, 1), ("Mitchell", 0, 0)))]
GOOD_FOR_HIM = list(glue.WSC_SIMPLE_BLANKED)[0]


def test_wsc_simple_matches_t5s_published_examples():
  wsc = {"wsc.fixed": WSC + [{"text": GOOD_FOR_HIM, "span1_text": "John", "span1_index": 15,
                              "span2_text": "him", "span2_index": 0, "label": 1, "idx": 2}]}
  inputs = "wsc: Mitchell asked Tom if *he* could lend some money."
  with tfds.testing.mock_data(as_dataset_fn=_mock_examples(wsc)):
    train = inference.task_examples("super_glue_wsc_simple_train", "train", LENGTHS)
    assert [(ex["inputs_pretokenized"], ex["targets_pretokenized"]) for ex in train] == [
        (inputs, "Tom"), ('wsc: The boy continued to whip the pony , and eventually the pony '
                          'threw him over. John laughed out quite loud. "Good for *him* ," he '
                          'said.', "John")]
    assert set(seqio.get_mixture_or_task("super_glue_wsc_simple_train").splits) == {"train"}
    examples = inference.task_examples("super_glue_wsc_simple_eval", "validation", LENGTHS, 2)
  assert [(ex["inputs_pretokenized"], ex["targets_pretokenized"], ex["label"])
          for ex in examples] == [(inputs, "Tom", 1), (inputs, "Mitchell", 0)]
  # The model names the referent: right where the candidate is it (label 1), and where
  # it is not (label 0) right unless it names that candidate.
  def scored(predictions):
    return inference.postprocess_and_evaluate("super_glue_wsc_simple_eval", examples,
                                              predictions)
  assert scored(["Tom", "Tom"]) == ([1, 0], {"accuracy": 100.0})
  assert scored(["the Tom", "Mitchell"]) == ([1, 1], {"accuracy": 50.0})
  assert scored(["", "Tom"]) == ([-1, 0], {"accuracy": 50.0})


def test_wsc_simple_stops_where_span2_index_is_not_the_pronoun():
  bad = {"wsc.fixed": [{**WSC[0], "span2_index": 3}]}
  with tfds.testing.mock_data(as_dataset_fn=_mock_examples(bad)):
    with pytest.raises(tf.errors.InvalidArgumentError, match="span2_index is not span2_text"):
      inference.task_examples("super_glue_wsc_simple_eval", "validation", LENGTHS)


def test_wsc_simple_postprocessor_as_t5s_tests():
  # T5's postprocessors_test.test_wsc_simple: (prediction, candidate) -> names it?
  cases = {("potato", "turnip"): 0, ("turnip", "turnip"): 1, ("the cat", "cat"): 1,
           ("Bob's hat", "Bob"): 0, ("Bob's hat", "Bob's hat"): 1, ("potato", "Potato"): 1,
           ("a potato", "my potato"): 1, ("fuzzy bunny", "fuzzy hungry bunny"): 1,
           ("", "cat"): -1, ("a this", "cat"): -1}
  for (prediction, candidate), expected in cases.items():
    assert glue.wsc_simple_referent(prediction, example={"targets_pretokenized": candidate},
                                    is_target=False) == expected, (prediction, candidate)
  for label in (1, -1):
    assert glue.wsc_simple_referent("blah", example={"label": label}, is_target=True) == label


def test_label_names_are_tfds():
  for labels, builder in ((glue.GLUE_LABELS, "glue"), (glue.SUPER_GLUE_LABELS, "super_glue")):
    configs = tfds.builder_cls(builder).builder_configs
    for name, names in labels.items():
      config = configs["wsc.fixed" if name == "wsc" else name]
      assert tuple(config.label_classes) == names, name


def test_every_task_reads_mock_data_and_scores_perfect_predictions():
  names = [n for n in seqio.TaskRegistry.names() if n.startswith(("glue_", "super_glue_"))]
  assert len(names) == (9 + 1) + (8 + 2 + 2)  # with the diagnostics and wsc_simple
  for mixture, rates in (("glue", glue.GLUE_RATES), ("super_glue", glue.SUPER_GLUE_RATES)):
    assert [t.name for t in seqio.get_mixture_or_task(mixture).tasks] == sorted(
        f"{mixture}_{n}" for n in rates)
  assert "wnli" not in glue.GLUE_RATES and not set(glue.DIAGNOSTICS) & {
      *glue.GLUE_RATES, *glue.SUPER_GLUE_RATES}
  with tfds.testing.mock_data(num_examples=4):
    # wsc_simple checks its spans, which mock data's random texts miss (tested above).
    for name in [n for n in names if "wsc_simple" not in n]:
      benchmark = name.split("_")[-1]
      split = "test" if benchmark in glue.DIAGNOSTICS else "validation"
      examples = inference.task_examples(name, split, LENGTHS)
      formatted_as = glue.DIAGNOSTICS.get(benchmark, benchmark)
      assert all(ex["inputs_pretokenized"].startswith(formatted_as + " ")
                 for ex in examples), name
      assert examples[0]["inputs"][0] == 259  # [NLU]
      targets = [ex["targets_pretokenized"] for ex in examples]
      named = None
      if benchmark in glue.DIAGNOSTICS:  # T5 gives them no metrics; one named in gin scores
        assert inference.postprocess_and_evaluate(name, examples, targets)[1] == {}, name
        named = [metrics.accuracy]
      _, perfect = inference.postprocess_and_evaluate(name, examples, targets, named)
      if benchmark == "stsb":  # random scores: correlation 1 with themselves
        assert perfect == pytest.approx({"pearson_corrcoef": 100, "spearman_corrcoef": 100})
      elif benchmark != "cola":  # cola: Matthews is 0 when mock labels are all one class
        assert perfect == pytest.approx(dict.fromkeys(perfect, 100)), (name, perfect)
      _, wrong = inference.postprocess_and_evaluate(name, examples, ["nonsense"] * len(targets),
                                                    named)
      if benchmark == "stsb":  # constant predictions: no correlation (nan, as scipy says)
        assert all(math.isnan(v) for v in wrong.values()), wrong
      else:
        assert min(wrong.values()) < 100, (name, wrong)
    assert set(seqio.get_mixture_or_task("glue_mnli").splits) == set(glue.MNLI_SPLITS)
    assert inference.task_examples("glue_mnli", "validation_mismatched", LENGTHS, 1)


def test_grouped_superglue_metrics_by_hand():
  # Question (0, 1): both answers right; question (0, 2): one of two wrong.
  targets = [{"value": v, "group": g} for v, g in ((1, (0, 1)), (0, (0, 1)), (1, (0, 2)),
                                                   (1, (0, 2)))]
  predictions = [{"value": v} for v in (1, 0, 1, -1)]
  assert glue.multirc_exact_match(targets, predictions) == {"exact_match": 50.0}
  # TP 2, FN 1 (the invalid prediction counts as wrong): F1 = 4/5.
  assert glue.multirc_f1(targets, predictions) == {"f1": pytest.approx(80.0)}
  # A query repeated once per answer counts once; its prediction matches one answer.
  targets = [{"value": ["Obama", "Barack Obama"], "group": (1, 2)}] * 2 + [
      {"value": ["Paris"], "group": (1, 3)}]
  predictions = [{"value": "barack obama"}, {"value": "x"}, {"value": "in Paris"}]
  assert glue.record_squad(targets, predictions) == {
      "em": pytest.approx(50.0), "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}


def test_a_dataset_not_built_is_one_line_naming_tfds_build(tmp_path):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  result = run_job("train", MODEL, "--gin_file=gin_configs/runs/pretrain.gin",
                   f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=1",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                   "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'", f"--tfds_data_dir={data_dir}")
  one_line_error(result, f"tfds build glue/sst2 --data_dir={data_dir}",
                 f"--tfds_data_dir={data_dir}")
  assert not list(data_dir.iterdir())  # nothing downloaded


def _sst2(builder, split, **kwargs) -> tf.data.Dataset:
  """mock_data's `as_dataset_fn` for glue/sst2: tensor slices, which the trainer can
  checkpoint (mock_data's own examples come from a Python generator, which it cannot)."""
  del builder, split, kwargs
  sentences = ["a charming journey", "dull , dull , dull", "the best film of the year",
               "it never takes off", "warm and funny", "a waste of time", "smart", "tedious"]
  return tf.data.Dataset.from_tensor_slices({
      "sentence": sentences, "label": [1, 0] * 4, "idx": list(range(len(sentences)))})


def test_fine_tune_on_sst2_and_eval_through_the_cli(tmp_path):
  lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"
  pretrained = tmp_path / "pretrained"
  result = run_job("train", MODEL, "--gin_file=gin_configs/runs/pretrain.gin", lengths,
                   f"--gin.MODEL_DIR='{pretrained}'", "--gin.TRAIN_STEPS=1",
                   "--gin.MIXTURE_OR_TASK_NAME='ul2x_reverse'", "--gin.BATCH_SIZE=8",
                   "--gin.train.eval_every=0")
  assert result.returncode == 0, result.stderr[-3000:]
  model_dir, eval_dir = tmp_path / "sst2", tmp_path / "eval"
  with tfds.testing.mock_data(as_dataset_fn=_sst2):
    result = run_job("train", MODEL, "--gin_file=gin_configs/runs/finetune_glue.gin", lengths,
                     f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'",
                     "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'", "--gin.TRAIN_STEPS=2",
                     "--gin.BATCH_SIZE=8", "--gin.train.eval_every=0",
                     "--gin.train.checkpoint_every=2", "--gin.train.infer_eval_every=2",
                     "--gin.train.infer_eval_metrics=['accuracy', 'f1']")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "glue_sst2/f1" in result.stdout, result.stdout[-2000:]
    result = run_job("eval", MODEL, "--gin_file=gin_configs/runs/eval.gin", lengths,
                     f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'",
                     "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'", "--gin.evaluate.batch_size=8")
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = [json.loads(line) for line in (eval_dir / "metrics.jsonl").read_text().splitlines()]
  assert row["step"] == 2 and 0 <= row["glue_sst2/accuracy"] <= 100
