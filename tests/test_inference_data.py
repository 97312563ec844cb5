"""Tests for the data side of inference and evaluation: the ul2x_reverse and ul2x_lm tasks,
ul2x.tasks.inference (task and file examples, prompt and scoring batches, metrics)."""

import json

import numpy as np
import pytest
import tensorflow as tf

import ul2x.tasks
from ul2x.tasks import default_tasks, inference, metrics, pipeline, vocabularies

VOCAB = vocabularies.byte_vocabulary()
S2S = vocabularies.paradigm_token_id(VOCAB, "[S2S]")
REVERSE_LENGTHS = {"inputs": 8, "targets": 8}
LM_LENGTHS = {"targets": 32}


def _reverse_examples(count: int = 5, split: str = "validation") -> list[dict]:
  return inference.task_examples("ul2x_reverse", split, REVERSE_LENGTHS, count)


def test_reverse_task_examples_are_reversals_led_by_the_mode_token():
  examples = _reverse_examples(50)
  assert len(examples) == 50
  for ex in examples:
    assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
    assert ex["inputs"][0] == S2S and ex["inputs"][-1] == VOCAB.eos_id
    assert ex["targets"][-1] == VOCAB.eos_id
    text = VOCAB.decode(ex["inputs"][1:].tolist())
    assert 2 <= len(text) <= 6 and set(text) <= set(default_tasks.REVERSE_LETTERS)
    assert VOCAB.decode(ex["targets"].tolist()) == text[::-1]
    assert ex["inputs_pretokenized"] == text  # as a file's inputs: without the mode token
    assert ex["targets_pretokenized"] == text[::-1]
  again = _reverse_examples(50)
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(examples, again))
  test = [ex["inputs_pretokenized"] for ex in _reverse_examples(50, "test")]
  assert test != [ex["inputs_pretokenized"] for ex in examples]
  assert len(default_tasks.reverse_strings("train")) == 20_000


def test_task_examples_are_cut_as_seqio_cuts_them_and_marked():
  lengths = {"inputs": 5, "targets": 5}
  examples = inference.task_examples("ul2x_reverse", "validation", lengths, 30)
  whole = inference.task_examples("ul2x_reverse", "validation", {"inputs": 9, "targets": 9}, 30)
  task = pipeline.mixture_or_task("ul2x_reverse")
  seqio_cut = task.get_dataset(sequence_length=lengths, split="validation", shuffle=False,
                               num_epochs=1, use_cached=False).take(30).as_numpy_iterator()
  marks = set()
  for ex, expected, full in zip(examples, seqio_cut, whole, strict=True):
    assert "truncated" not in full
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(ex[key], expected[key])
    cut = [key for key in ("inputs", "targets") if len(full[key]) > lengths[key]]
    assert ex.get("truncated", []) == cut
    marks.add(tuple(cut))
  assert marks == {(), ("inputs",), ("inputs", "targets")}
  assert inference.truncation(examples, lengths) == (
      f"{sum('inputs' in e.get('truncated', ()) for e in examples)} of 30 inputs (to 5 tokens), "
      f"{sum('targets' in e.get('truncated', ()) for e in examples)} of 30 targets (to 5 tokens)")
  assert inference.truncation(whole, {}) == ""


def test_task_examples_bad_names_raise():
  with pytest.raises(ValueError, match="unknown seqio task or mixture 'nope'; registered: .*"
                                       "ul2x_reverse"):
    inference.task_examples("nope", "validation", REVERSE_LENGTHS)
  with pytest.raises(ValueError, match=r"task 'ul2x_reverse' has no split 'dev'; its splits "
                                       r"are \['test', 'train', 'validation'\]"):
    inference.task_examples("ul2x_reverse", "dev", REVERSE_LENGTHS)
  with pytest.raises(ValueError, match="'ul2x_ul2' is a mixture, not a task; pass one of its "
                                       "tasks: ul2x_ul2_r3_15"):
    inference.task_examples("ul2x_ul2", "validation", REVERSE_LENGTHS)


def test_lm_task_is_fully_causal_with_loss_on_every_token():
  ds = ul2x.tasks.get_dataset("ul2x_lm", LM_LENGTHS, "train", 4, architecture="decoder_only")
  (batch,) = list(ds.take(1).as_numpy_iterator())
  expected = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions"}
  assert set(batch) == expected == set(ul2x.tasks.feature_lengths_for("decoder_only",
                                                                       LM_LENGTHS))
  assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in batch.values())
  np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                batch["decoder_target_tokens"] != 0)
  assert batch["decoder_loss_weights"].all()  # chunks fill the length: no padding
  with pytest.raises(ValueError, match="'encoder_decoder' needs a task with 'inputs'"):
    ul2x.tasks.get_dataset("ul2x_lm", LM_LENGTHS, "train", 4)
  with pytest.raises(ValueError, match=r"do not match the features \['targets'\] of 'ul2x_lm'"):
    ul2x.tasks.get_dataset("ul2x_lm", REVERSE_LENGTHS, "train", 4, architecture="decoder_only")


def _converted(examples: list[dict], architecture: str, lengths: dict) -> list[dict]:
  """What the training pipeline's seqio converter (pack=False) makes of `examples`."""
  keys = [k for k in ("inputs", "targets") if k in lengths]
  ds = tf.data.Dataset.from_generator(
      lambda: ({k: ex[k] for k in keys} for ex in examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})
  converter = pipeline.feature_converter(architecture, pack=False, has_inputs="inputs" in keys)
  ds = converter(ds, lengths).batch(len(examples)).map(pipeline._with_segment_ids)
  (batch,) = list(ds.as_numpy_iterator())
  return batch


@pytest.mark.parametrize("name,architecture,lengths", [
    ("ul2x_reverse", "encoder_decoder", REVERSE_LENGTHS),
    ("ul2x_reverse", "decoder_only", REVERSE_LENGTHS),
    ("ul2x_lm", "decoder_only", LM_LENGTHS),
])
def test_score_batches_equal_the_training_converters(name, architecture, lengths):
  examples = inference.task_examples(name, "validation", lengths, 4)
  if name == "ul2x_lm":  # a short document's tail, to cover padding
    examples.append({"targets": np.array([40, 41, VOCAB.eos_id], np.int32)})
  expected = _converted(examples, architecture, lengths)
  batches = list(inference.score_batches(examples, architecture=architecture,
                                         task_feature_lengths=lengths, batch_size=3))
  assert [real for _, real in batches] == [3, len(examples) - 3]
  assert set(batches[0][0]) == set(expected)
  assert set(ul2x.tasks.feature_lengths_for(architecture, lengths)) == set(expected)
  for key, value in expected.items():
    got = np.concatenate([batch[key] for batch, _ in batches])
    assert got.dtype == np.int32, key
    np.testing.assert_array_equal(got[:len(examples)], value, err_msg=key)
    assert not got[len(examples):].any(), key


def test_predict_batches_lay_out_prompts_as_in_training():
  examples = _reverse_examples(3)
  (batch, real), = inference.predict_batches(examples, architecture="encoder_decoder",
                                             task_feature_lengths=REVERSE_LENGTHS, batch_size=4)
  assert real == 3 and set(batch) == {"encoder_input_tokens"}
  assert batch["encoder_input_tokens"].shape == (4, 8)
  assert not batch["encoder_input_tokens"][3].any()
  np.testing.assert_array_equal(batch["encoder_input_tokens"][0, :len(examples[0]["inputs"])],
                                examples[0]["inputs"])

  (prompts, real), = inference.predict_batches(examples, architecture="decoder_only",
                                               task_feature_lengths=REVERSE_LENGTHS, batch_size=4)
  (scored, _), = inference.score_batches(examples, architecture="decoder_only",
                                         task_feature_lengths=REVERSE_LENGTHS, batch_size=4)
  assert set(prompts) == {"decoder_input_tokens", "decoder_segment_ids",
                          "decoder_causal_attention"}
  assert all(v.shape == (4, 9) and v.dtype == np.int32 for v in prompts.values())
  for row, ex in enumerate(examples):
    width = len(ex["inputs"]) + 1
    np.testing.assert_array_equal(prompts["decoder_input_tokens"][row, :width],
                                  scored["decoder_input_tokens"][row, :width])
    assert not prompts["decoder_input_tokens"][row, width:].any()
    np.testing.assert_array_equal(prompts["decoder_causal_attention"][row],
                                  scored["decoder_causal_attention"][row, :9])
    assert list(prompts["decoder_segment_ids"][row]) == [1] * width + [0] * (9 - width)
  assert not any(v[3].any() for v in prompts.values())

  lm = [{"targets": np.array([40, VOCAB.eos_id], np.int32)}]
  (prompts, real), = inference.predict_batches(lm, architecture="decoder_only",
                                               task_feature_lengths=LM_LENGTHS, batch_size=2)
  assert real == 1
  assert prompts["decoder_input_tokens"].tolist() == [[0], [0]]
  assert prompts["decoder_segment_ids"].tolist() == [[1], [0]]
  assert prompts["decoder_causal_attention"].tolist() == [[0], [0]]


def test_file_examples_jsonl_and_text(tmp_path):
  jsonl = tmp_path / "in.jsonl"
  jsonl.write_text(json.dumps({"inputs": "abc", "targets": "cba"}) + "\n\n"
                   + json.dumps({"inputs": "abcdefghij"}) + "\n")
  lengths = {"inputs": 6, "targets": 8}
  first, second = inference.file_examples(str(jsonl), mode_token="[S2S]",
                                          task_feature_lengths=lengths)
  assert first["inputs"].tolist() == [S2S] + VOCAB.encode("abc") + [VOCAB.eos_id]
  assert first["targets"].tolist() == VOCAB.encode("cba") + [VOCAB.eos_id]
  assert first["inputs_pretokenized"] == "abc" and first["targets_pretokenized"] == "cba"
  # Truncated to the length with EOS kept last, as seqio's append_eos_after_trim does.
  assert second["inputs"].tolist() == [S2S] + VOCAB.encode("abcd") + [VOCAB.eos_id]
  assert "targets" not in second and second["inputs"].dtype == np.int32
  assert "truncated" not in first and second["truncated"] == ["inputs"]

  text = tmp_path / "in.txt"
  text.write_text("hello world\n\n  \nsecond line\n")
  examples = inference.file_examples(str(text), task_feature_lengths={"inputs": 32})
  assert [ex["inputs_pretokenized"] for ex in examples] == ["hello world", "second line"]
  assert examples[0]["inputs"].tolist() == VOCAB.encode("hello world") + [VOCAB.eos_id]


def test_file_examples_errors_name_the_problem(tmp_path):
  lengths = {"inputs": 16, "targets": 16}
  with pytest.raises(ValueError, match="input file '.*missing.txt' does not exist"):
    inference.file_examples(str(tmp_path / "missing.txt"), task_feature_lengths=lengths)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"inputs": "a"}\nnot json\n')
  with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
    inference.file_examples(str(bad), task_feature_lengths=lengths)
  bad.write_text('{"inputs": "a"}\n{"question": "b"}\n')
  with pytest.raises(ValueError, match="bad.jsonl line 2 has no 'inputs' string"):
    inference.file_examples(str(bad), task_feature_lengths=lengths)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  with pytest.raises(ValueError, match="empty.txt' holds no inputs"):
    inference.file_examples(str(empty), task_feature_lengths=lengths)
  with pytest.raises(ValueError, match=r"mode_token '\[XYZ\]' is not one of \[NLU\], \[NLG\], "
                                       r"\[S2S\]; pass one of them, or None"):
    inference.file_examples(str(empty), mode_token="[XYZ]", task_feature_lengths=lengths)


def test_metrics_and_postprocessing():
  assert metrics.exact_match(["a", "b"], ["a", "b"]) == {"exact_match": 100.0}
  assert metrics.exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == {"exact_match": 50.0}
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.exact_match(["a", "b"], ["a"])
  examples = _reverse_examples(4)
  targets = [ex["targets_pretokenized"] for ex in examples]
  predictions = [f" {targets[0]}\n", targets[1], "wrong", ""]
  processed, scores = inference.postprocess_and_evaluate("ul2x_reverse", examples, predictions)
  assert processed == [targets[0], targets[1], "wrong", ""]
  assert scores == {"exact_match": 50.0}
  lm = [{"targets": np.array([40, 1]), "targets_pretokenized": "E"}]
  assert inference.postprocess_and_evaluate("ul2x_lm", lm, ["E"]) == (["E"], {})
  with pytest.raises(ValueError, match="got 1 predictions for 4 examples"):
    inference.postprocess_and_evaluate("ul2x_reverse", examples, ["x"])


def test_decode_stops_at_eos_and_spells_reserved_ids():
  ids = [S2S] + VOCAB.encode("ab") + [vocabularies.sentinel_id(VOCAB, 0), VOCAB.eos_id] + (
      VOCAB.encode("zz"))
  assert inference.decode(ids) == "[S2S]ab<extra_id_0>"
  assert inference.decode(np.array([VOCAB.eos_id, 40])) == ""


def test_causal_prompts_have_no_eos_and_no_bidirectional_prefix(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("ab\n")
  lengths = {"inputs": 6, "targets": 4}
  prefix_lm, = inference.file_examples(str(path), task_feature_lengths=lengths)
  causal, = inference.file_examples(str(path), task_feature_lengths=lengths,
                                    causal_prompt=True)
  np.testing.assert_array_equal(prefix_lm["inputs"], [97 + 3, 98 + 3, 1])
  np.testing.assert_array_equal(causal["prompt"], [97 + 3, 98 + 3])
  (batch, rows), = inference.predict_batches([causal], architecture="decoder_only",
                                             task_feature_lengths=lengths, batch_size=1)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 100, 101, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["decoder_segment_ids"][0], [1, 1, 1, 0, 0, 0, 0])
  assert not batch["decoder_causal_attention"].any() and rows == 1
  with pytest.raises(ValueError, match="needs examples with 'inputs'"):
    next(inference.predict_batches([causal], architecture="encoder_decoder",
                                   task_feature_lengths=lengths, batch_size=1))
