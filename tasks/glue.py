"""GLUE and SuperGLUE in T5's text-to-text form: the tasks `glue_<name>` and
`super_glue_<name>` over the TFDS datasets built in the user's TFDS data directory, and
the mixtures `glue` and `super_glue`.

As T5's `preprocessors.glue`: the inputs are "<benchmark> <key>: <text> <key>: <text>"
(keys sorted, or T5's order for multirc and wic), the target the label's name
("sst2 sentence: it 's a charming journey ." -> "positive"), stsb's score rounded to
0.2 as "3.8"; wsc marks its two spans with * and #, record asks for one entity. The
postprocessors turn decoded text back into a class index (-1 for an unknown label), a
float or an answer, and each task has T5's metrics. The diagnostics (GLUE's ax,
SuperGLUE's axb and axg; test splits only) are formatted as the benchmark whose
fine-tuned model predicts them (mnli, rte) and, as in T5, have no metrics.
`super_glue_wsc_simple_train` and `_eval` are T5's "wsc_simple" form: the pronoun marked
*he*, the target the candidate's text ("wsc: Mitchell asked Tom if *he* could lend some
money." -> "Tom").

The mixtures weigh each task by its training examples as T5's `glue_v002_proportional`
and `super_glue_v102_proportional` do; they leave out GLUE's wnli (as T5) and the
diagnostics (T5 lists them at rate 0: never sampled), and train WSC in the marked-span
True/False form of T5's `preprocessors.wsc` where T5 trains wsc_simple with DPR data.

Registering reads nothing: a dataset is opened when a job reads it, and one not built
is one line naming its `tfds build` command. Inputs lead with the [NLU] mode token
(classification, in UL2's mode switching).
"""

import collections
import functools

import numpy as np
import seqio
import tensorflow as tf

from ul2x.tasks import finetune, metrics
from ul2x.tasks.registry import LocalTfdsDataSource

GLUE_VERSION, SUPER_GLUE_VERSION = "2.0.0", "1.0.2"  # as T5's glue_*_v002, super_glue_*_v102
MODE_TOKEN = "[NLU]"
# T5's glue_utils: the mixing rate is the number of training examples.
GLUE_RATES = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "qqp": 363_849, "stsb": 5_749,
              "mnli": 392_702, "qnli": 104_743, "rte": 2_490}
SUPER_GLUE_RATES = {"boolq": 9_427, "cb": 250, "copa": 400, "multirc": 27_243,
                    "record": 138_854, "rte": 2_490, "wic": 5_428, "wsc": 554}
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"), "ax": ("entailment", "neutral", "contradiction")}
SUPER_GLUE_LABELS = {
    "boolq": ("False", "True"), "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"), "multirc": ("False", "True"),
    "rte": ("entailment", "not_entailment"), "wic": ("False", "True"), "wsc": ("False", "True"),
    "axb": ("entailment", "not_entailment"), "axg": ("entailment", "not_entailment")}
# Each diagnostic -> the benchmark it is formatted as: the model fine-tuned on that one
# predicts it (T5's glue_utils casts ax as MNLI, axb and axg as RTE).
DIAGNOSTICS = {"ax": "mnli", "axb": "rte", "axg": "rte"}
# T5's feature order where it does not sort the keys (wic leaves out the word's offsets).
FEATURE_ORDER = {"multirc": ("question", "answer", "paragraph"),
                 "wic": ("sentence1", "sentence2", "word")}
SPLITS = {"train": "train", "validation": "validation", "test": "test"}
MNLI_SPLITS = {"train": "train", "validation": "validation_matched",
               "validation_mismatched": "validation_mismatched", "test": "test_matched",
               "test_mismatched": "test_mismatched"}
TEST_SPLITS = {"test": "test"}
# T5's wsc_simple tasks: the train task keeps only the examples whose candidate is the
# referent (its target is then right); the eval task scores whether a prediction names it.
WSC_SIMPLE_SPLITS = {"train": {"train": "train"},
                     "eval": {"validation": "validation", "test": "test"}}
# T5's `_wsc_inputs`: two WSC texts whose word span2_index is not the bare pronoun, blanked
# by hand.
WSC_SIMPLE_BLANKED = {
    'The boy continued to whip the pony , and eventually the pony threw him over. John '
    'laughed out quite loud. "Good for him," he said. ':
        'The boy continued to whip the pony , and eventually the pony threw him over. John '
        'laughed out quite loud. "Good for X ," he said.',
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
    "magic pebble in an iron safe . Some day they might want to use it , but really for "
    "now, what more could they wish for?":
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
        "magic pebble in an iron safe . Some day they might want to use X , but really for "
        "now, what more could they wish for?"}
# T5's `postprocessors.wsc_simple` ignores these when matching a prediction to the referent.
DETERMINERS = frozenset({
    "a", "an", "few", "her", "his", "each", "every", "many", "much", "my", "our", "some",
    "that", "the", "their", "these", "this", "those", "which", "whose", "your"})


def _label_name(label: tf.Tensor, names) -> tf.Tensor:
  """The label's name; '<unk>' for an unlabelled (test) example's -1, as T5."""
  return tf.where(label < 0, "<unk>", tf.gather(tf.constant(names), tf.maximum(label, 0)))


@seqio.map_over_dataset
def glue_text(x, benchmark: str, label_names) -> dict:
  """T5's `preprocessors.glue`: {'inputs': "<benchmark> <key>: <text> ...", 'targets':
  label name}, multirc's HTML tags removed and its index kept as `idx/<part>`."""
  keys = FEATURE_ORDER.get(benchmark) or sorted(set(x) - {"label", "idx"})
  parts = [benchmark]
  for key in keys:
    parts += [f"{key}:", x[key]]
  inputs = tf.strings.join(parts, separator=" ")
  ex = {"targets": _label_name(x["label"], label_names)}
  if benchmark == "multirc":
    inputs = tf.strings.regex_replace(tf.strings.regex_replace(inputs, "<br>", " "),
                                      "<(/)?b>", "")
    ex.update({f"idx/{k}": x["idx"][k] for k in ("paragraph", "question", "answer")})
  ex["inputs"] = inputs
  return ex


@seqio.map_over_dataset
def stsb_text(x) -> dict:
  """T5's `preprocessors.stsb`: the similarity score rounded to 0.2, as text ('3.8')."""
  inputs = tf.strings.join(["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]],
                           separator=" ")
  return {"inputs": inputs,
          "targets": tf.strings.as_string(tf.round(x["label"] * 5) / 5, precision=1)}


def _mark_span(text: tf.Tensor, span: tf.Tensor, index: tf.Tensor, mark: str) -> tf.Tensor:
  """Surrounds the word-`index` occurrence of `span` in `text` with `mark`."""
  pattern = tf.strings.join([r"^((?:\S+\s){", tf.strings.as_string(index), "})(", span, ")"])
  return tf.strings.regex_replace(text, pattern, rf"\1{mark} \2 {mark}")


@seqio.map_over_dataset
def wsc_text(x) -> dict:
  """T5's `preprocessors.wsc`: "wsc text: ..." with the candidate marked * * and the
  pronoun # #; the target 'True' when the pronoun refers to the candidate."""
  text = _mark_span(x["text"], x["span1_text"], x["span1_index"], "*")
  # Marking span 1 added two words before span 2 when it came first.
  span2_index = x["span2_index"] + 2 * tf.cast(x["span1_index"] < x["span2_index"], tf.int32)
  text = _mark_span(text, x["span2_text"], span2_index, "#")
  return {"inputs": tf.strings.join(["wsc text:", text], separator=" "),
          "targets": _label_name(x["label"], SUPER_GLUE_LABELS["wsc"])}


def _wsc_blanked(x) -> tf.Tensor:
  """T5's `_wsc_inputs`: the text with the pronoun (word `span2_index`) replaced by X."""
  words = tf.strings.split(x["text"], sep=" ")
  index = x["span2_index"]
  # T5 checks that the index is the pronoun's; the data holds only the two exceptions
  # in WSC_SIMPLE_BLANKED, so a failure here is a different dataset, not a text to guess.
  with tf.control_dependencies([
      tf.debugging.assert_greater(index, 0, message="wsc_simple: pronoun is the first word"),
      tf.debugging.assert_less(index, tf.size(words), message="wsc_simple: index past text"),
      tf.debugging.assert_equal(tf.gather(words, index), x["span2_text"],
                                message="wsc_simple: word span2_index is not span2_text")]):
    return tf.strings.join([tf.strings.reduce_join(words[:index], separator=" "), "X",
                            tf.strings.reduce_join(words[index + 1:], separator=" ")],
                           separator=" ")


def wsc_simple_text(dataset: tf.data.Dataset, correct_referent_only: bool) -> tf.data.Dataset:
  """T5's `preprocessors.wsc_simple`: "wsc: <text>" with the pronoun marked *he*, the
  target the candidate's text (span 1) whether or not the pronoun refers to it, `label`
  1 when it does; `correct_referent_only` keeps only those examples (for training)."""
  by_hand = tf.constant(list(WSC_SIMPLE_BLANKED))
  blanked_by_hand = tf.constant(list(WSC_SIMPLE_BLANKED.values()))

  def simple(x):
    known = tf.equal(by_hand, x["text"])
    blanked = tf.cond(tf.reduce_any(known),
                      lambda: tf.boolean_mask(blanked_by_hand, known)[0],
                      lambda: _wsc_blanked(x))
    marked = tf.strings.regex_replace(blanked, " X ",
                                      tf.strings.join([" *", x["span2_text"], "* "]))
    return {"inputs": tf.strings.join(["wsc:", marked], separator=" "),
            "targets": x["span1_text"], "label": x["label"]}

  if correct_referent_only:
    dataset = dataset.filter(lambda x: x["label"] == 1)
  return dataset.map(simple, num_parallel_calls=tf.data.AUTOTUNE)


def record_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """T5's `preprocessors.record`: one example per answer (one with target '<unk>' when
  there is none), "record query: <query> entities: <e1>, <e2> passage: <passage>", the
  passage's '@highlight' lines joined as sentences; all answers kept as `answers`."""

  def per_answer(x):
    count = tf.maximum(tf.size(x["answers"]), 1)
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join(["record query:", x["query"], "entities:",
                              tf.strings.reduce_join(x["entities"], separator=", "),
                              "passage:", passage], separator=" ")
    targets = tf.cond(tf.size(x["answers"]) > 0, lambda: x["answers"],
                      lambda: tf.constant(["<unk>"]))

    def repeat(t):
      return tf.broadcast_to(t, tf.concat([[count], tf.shape(t)], 0))

    return tf.data.Dataset.from_tensor_slices({
        "inputs": repeat(inputs), "targets": targets, "answers": repeat(x["answers"]),
        "idx/passage": repeat(x["idx"]["passage"]), "idx/query": repeat(x["idx"]["query"])})

  return dataset.flat_map(per_answer)


def label_to_class(text, example=None, is_target=False, *, label_names) -> int:
  """Postprocessor: the index of the decoded label name, -1 for any other text."""
  del example, is_target
  text = metrics.as_text(text)
  return label_names.index(text) if text in label_names else -1


def text_to_float(text, example=None, is_target=False) -> float:
  """Postprocessor: the decoded number, -1.0 for text that is not one (as T5)."""
  del example, is_target
  try:
    return float(metrics.as_text(text))
  except ValueError:
    return -1.0


def wsc_simple_referent(text, example=None, is_target=False) -> int:
  """Postprocessor (T5's `postprocessors.wsc_simple`): a target is the example's label; a
  prediction is 1 when it names the candidate (its words, determiners and case aside, a
  subset or superset of the candidate's, and both or neither possessive), 0 when it does
  not, -1 when it is empty."""
  if is_target:
    return int(example["label"])

  def clean(phrase):
    return " ".join(w for w in metrics.as_text(phrase).lower().split(" ")
                    if w not in DETERMINERS)

  predicted, candidate = clean(text), clean(example["targets_pretokenized"])
  if not predicted:  # so that an empty prediction cannot match a label 0 by chance
    return -1
  if ("'" in predicted) != ("'" in candidate):  # "Bob" does not name "Bob's hat"
    return 0
  predicted_words, candidate_words = set(predicted.split(" ")), set(candidate.split(" "))
  return int(predicted_words <= candidate_words or candidate_words <= predicted_words)


def multirc_answer(text, example=None, is_target=False) -> dict:
  """Postprocessor: {'value': 0/1 (-1 unknown), 'group': the answer's question}."""
  del is_target  # a prediction is grouped by its example as its target is
  value = label_to_class(text, label_names=SUPER_GLUE_LABELS["multirc"])
  return {"value": value, "group": (int(example["idx/paragraph"]), int(example["idx/question"]))}


def record_answer(text, example=None, is_target=False) -> dict:
  """Postprocessor: {'value': the answer (a target: all answers), 'group': the query}."""
  value = ([a.decode("utf-8") for a in example["answers"]] if is_target
           else metrics.as_text(text))
  return {"value": value, "group": (int(example["idx/passage"]), int(example["idx/query"]))}


def multirc_f1(targets, predictions) -> dict[str, float]:
  """{'f1'}: binary F1 over all answers (T5's `multirc_f1_over_all_answers`)."""
  return metrics.f1([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets, predictions) -> dict[str, float]:
  """{'exact_match'}: percent of questions with every answer right (T5's mean over groups)."""
  right = collections.defaultdict(list)
  for t, p in zip(targets, predictions):
    right[t["group"]].append(t["value"] == p["value"])
  return {"exact_match": 100 * float(np.mean([all(r) for r in right.values()]))}


def record_squad(targets, predictions) -> dict[str, float]:
  """{'em', 'f1'}: SQuAD metrics over the answers, each query once (its examples repeat
  it once per answer; T5's `deduplicate_metric(squad)`)."""
  seen, answers, predicted = set(), [], []
  for t, p in zip(targets, predictions):
    if t["group"] not in seen:
      seen.add(t["group"])
      answers.append(t["value"])
      predicted.append(p["value"])
  return metrics.squad(answers, predicted)


def _classification(name: str, labels) -> dict:
  benchmark = DIAGNOSTICS.get(name, name)
  return {"text_preprocessors": [functools.partial(glue_text, benchmark=benchmark,
                                                   label_names=labels)],
          "postprocess_fn": functools.partial(label_to_class, label_names=labels)}


def _glue_tasks() -> dict[str, dict]:
  """Task name -> register_finetune_task arguments (source aside) per GLUE dataset."""
  specs = {name: _classification(name, labels) for name, labels in GLUE_LABELS.items()}
  specs["stsb"] = {"text_preprocessors": [stsb_text], "postprocess_fn": text_to_float}
  fns = {"cola": [metrics.matthews_corrcoef], "mrpc": [metrics.f1, metrics.accuracy],
         "qqp": [metrics.f1, metrics.accuracy],
         "stsb": [metrics.pearson_corrcoef, metrics.spearman_corrcoef], "ax": []}
  for name, spec in specs.items():
    spec["metric_fns"] = fns.get(name, [metrics.accuracy])
    splits = {"mnli": MNLI_SPLITS, "ax": TEST_SPLITS}.get(name, SPLITS)
    spec["source"] = LocalTfdsDataSource(f"glue/{name}:{GLUE_VERSION}", splits)
  return {f"glue_{name}": spec for name, spec in specs.items()}


def _super_glue_tasks() -> dict[str, dict]:
  """Task name -> register_finetune_task arguments per SuperGLUE dataset."""
  specs = {name: _classification(name, labels) for name, labels in SUPER_GLUE_LABELS.items()}
  specs["multirc"] = {**specs["multirc"], "postprocess_fn": multirc_answer,
                      "keep_keys": ["idx/paragraph", "idx/question", "idx/answer"],
                      "metric_fns": [multirc_f1, multirc_exact_match]}
  specs["wsc"]["text_preprocessors"] = [wsc_text]
  specs["record"] = {"text_preprocessors": [record_text], "postprocess_fn": record_answer,
                     "keep_keys": ["answers", "idx/passage", "idx/query"],
                     "metric_fns": [record_squad]}
  specs["cb"]["metric_fns"] = [metrics.mean_multiclass_f1(3), metrics.accuracy]
  # axb's sentences are named as in GLUE; T5 renames them to read as SuperGLUE's rte.
  specs["axb"]["text_preprocessors"].insert(0, functools.partial(
      seqio.preprocessors.rekey, key_map={"premise": "sentence1", "hypothesis": "sentence2",
                                          "label": "label", "idx": "idx"}))
  for name, spec in specs.items():
    spec.setdefault("metric_fns", [] if name in DIAGNOSTICS else [metrics.accuracy])
    dataset = "wsc.fixed" if name == "wsc" else name
    splits = TEST_SPLITS if name in DIAGNOSTICS else SPLITS
    spec["source"] = LocalTfdsDataSource(f"super_glue/{dataset}:{SUPER_GLUE_VERSION}", splits)
  return {f"super_glue_{name}": spec for name, spec in specs.items()}


def _wsc_simple_tasks() -> dict[str, dict]:
  """`super_glue_wsc_simple_train` and `_eval`, as T5's `super_glue_wsc_v102_simple_*`."""
  specs = {}
  for part, splits in WSC_SIMPLE_SPLITS.items():
    spec = {"source": LocalTfdsDataSource(f"super_glue/wsc.fixed:{SUPER_GLUE_VERSION}", splits),
            "text_preprocessors": [functools.partial(wsc_simple_text,
                                                     correct_referent_only=part == "train")]}
    if part == "eval":
      spec.update(keep_keys=["label"], postprocess_fn=wsc_simple_referent,
                  metric_fns=[metrics.accuracy])
    specs[f"super_glue_wsc_simple_{part}"] = spec
  return specs


def register_glue_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers (replacing) every `glue_<name>` and `super_glue_<name>` task and the
  mixtures `glue` and `super_glue`, tokenized with `vocabulary` (default: bytes)."""
  for name, spec in {**_glue_tasks(), **_super_glue_tasks(), **_wsc_simple_tasks()}.items():
    finetune.register_finetune_task(name, mode_token=MODE_TOKEN, vocabulary=vocabulary, **spec)
  for mixture, rates in (("glue", GLUE_RATES), ("super_glue", SUPER_GLUE_RATES)):
    if mixture in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, [(f"{mixture}_{n}", r) for n, r in rates.items()])
