"""Examples and model batches for the infer and eval jobs (no JAX): a task's or a file's
examples, prompts for decoding, teacher-forced batches for scoring, the task's
postprocessing and metrics of decoded text, and the jobs' JSONL results written.

An example is `{'inputs': int32 [n] (when there are inputs), 'targets': int32 [m] (when
there are targets), 'inputs_pretokenized': str, 'targets_pretokenized': str}` (each text
beside its ids, the inputs' text without the mode token that leads its ids), each id
sequence ending in EOS as seqio appends it and no longer than its task feature length;
'truncated': [the features cut to their length] where any was.
"""

from collections.abc import Iterator, Mapping, Sequence
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np
import seqio

from ul2x.model.contract import contract_for, prompt_features, unpacked_segments_positions
from ul2x.tasks import pipeline
from ul2x.tasks.vocabularies import (PARADIGM_TOKENS, byte_vocabulary, decode_with_reserved,
                                     paradigm_token_id)

Example = dict[str, Any]
Batch = dict[str, np.ndarray]


def decode(ids: Sequence[int] | np.ndarray, vocabulary=None) -> str:
  """Text of `ids` up to the first EOS (id 1), mode tokens and sentinels spelled out
  (`[S2S]`, `<extra_id_0>`); padding dropped. `vocabulary`: a seqio vocabulary or a
  `vocabularies.HFTokenizer`, by default bytes."""
  vocabulary = vocabulary or byte_vocabulary()
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  if vocabulary.eos_id in ids:
    ids = ids[:ids.index(vocabulary.eos_id)]
  return decode_with_reserved(vocabulary, ids)


def _task(name: str) -> seqio.Task:
  provider = pipeline.mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    tasks = ", ".join(task.name for task in provider.tasks)
    raise ValueError(f"{name!r} is a mixture, not a task; pass one of its tasks: {tasks}.")
  return provider


def targets_vocabulary(name: str) -> seqio.Vocabulary:
  """The vocabulary task `name`'s targets (and so its predictions) are written in."""
  return _task(name).output_features["targets"].vocabulary


def task_examples(name: str, split: str, task_feature_lengths: Mapping[str, int],
                  num_examples: int | None = None) -> list[Example]:
  """Task `name`'s preprocessed examples of `split` in order (one epoch, unshuffled,
  unpacked), truncated to `task_feature_lengths` as seqio truncates them, each cut one
  marked 'truncated'; all of them unless `num_examples`.

  The texts are seqio's `*_pretokenized` features when the task keeps them, else the
  ids decoded (`decode`, so a sentinel shows as e.g. `<extra_id_0>`), the inputs without
  their leading mode token, as a file's inputs are given.
  """
  task = _task(name)
  pipeline.check_split(task, split)
  pipeline.check_feature_lengths(task, task_feature_lengths)
  untrimmed, eos_after_trim = _untrimmed(task)
  with pipeline.reading(task, split):
    ds = untrimmed.get_dataset(sequence_length=dict(task_feature_lengths), split=split,
                               shuffle=False, num_epochs=1, use_cached=False,
                               trim_output_features=False)
    if num_examples is not None:
      ds = ds.take(num_examples)
    return [_with_texts(_cut(ex, task.output_features, task_feature_lengths, eos_after_trim),
                        task.output_features) for ex in ds.as_numpy_iterator()]


def _untrimmed(task: seqio.Task) -> tuple[seqio.Task, bool]:
  """(`task` with seqio's `append_eos_after_trim` as plain `append_eos`, whether it had
  it): its examples as they were before seqio cut them, for `_cut` to cut and mark; a
  copy for reading only, not registered."""
  after_trim = seqio.preprocessors.append_eos_after_trim
  steps = [seqio.preprocessors.append_eos if getattr(p, "func", p) is after_trim else p
           for p in task.preprocessors]
  had = steps != list(task.preprocessors)
  return seqio.Task(task.name, source=task.source, output_features=task.output_features,
                    preprocessors=steps, shuffle_buffer_size=None), had


def _cut(ex: dict, features: Mapping[str, seqio.Feature], lengths: Mapping[str, int],
         eos_after_trim: bool) -> dict:
  """`ex` cut as seqio cuts it (`append_eos_after_trim`: to `length - 1`, then EOS;
  else its final trim to `length`), 'truncated' listing the features cut."""
  ex = dict(ex)
  for key, feature in features.items():
    ids, length = ex[key], lengths[key]
    if len(ids) <= length:
      continue
    if eos_after_trim and feature.add_eos:
      ex[key] = np.concatenate([ids[:length - 1], [feature.vocabulary.eos_id]]).astype(ids.dtype)
    else:
      ex[key] = ids[:length]
    ex.setdefault("truncated", []).append(key)
  return ex


def truncation(examples: Sequence[Example], task_feature_lengths: Mapping[str, int]) -> str:
  """'n of m inputs (to L tokens), ...' of the examples marked 'truncated' ('' if none)."""
  counts = {}
  for example in examples:
    for key in example.get("truncated", ()):
      counts[key] = counts.get(key, 0) + 1
  return ", ".join(f"{n} of {len(examples)} {key} (to {task_feature_lengths[key]} tokens)"
                   for key, n in counts.items())


def _with_texts(ex: Mapping[str, Any], features: Mapping[str, seqio.Feature]) -> Example:
  # The task's other features (e.g. GLUE's `idx/question`) are for its postprocess_fn;
  # 'truncated' is `_cut`'s mark.
  example = {k: v for k, v in ex.items() if k not in features}
  for key, feature in features.items():
    example[key] = np.asarray(ex[key], np.int32)
    text = ex.get(f"{key}_pretokenized")
    ids = example[key]
    if key == "inputs" and len(ids) and ids[0] in _mode_token_ids(feature.vocabulary):
      ids = ids[1:]
    example[f"{key}_pretokenized"] = (decode(ids, feature.vocabulary) if text is None
                                      else text.decode("utf-8"))
  return example


def _mode_token_ids(vocabulary: seqio.Vocabulary) -> set[int]:
  return {paradigm_token_id(vocabulary, token) for token in PARADIGM_TOKENS}


def file_examples(path: str, *, vocabulary=None,
                  mode_token: str | None = None, task_feature_lengths: Mapping[str, int],
                  causal_prompt: bool = False) -> list[Example]:
  """Examples from a file: '.jsonl' (a JSON object per line with an 'inputs' and an optional
  'targets' string) or, for any other extension, plain text with one input per non-empty line.

  Tokenized with `vocabulary` (a seqio vocabulary or a `vocabularies.HFTokenizer`,
  default bytes); `mode_token` ('[NLU]', '[NLG]', '[S2S]' or
  None) leads the inputs as its single reserved id, as in training; EOS appended after
  truncating to `task_feature_lengths` ('inputs', and 'targets' when a line has targets);
  'truncated' lists the features that were cut.
  `causal_prompt`: for a decoder-only causal LM, each input is text to continue: its ids
  go to 'prompt' without EOS, and `predict_batches` attends to them causally.
  """
  vocabulary = vocabulary or byte_vocabulary()
  if mode_token is not None and mode_token not in PARADIGM_TOKENS:
    raise ValueError(f"mode_token {mode_token!r} is not one of {', '.join(PARADIGM_TOKENS)}; "
                     "pass one of them, or None for no mode token.")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"input file {path!r} does not exist; pass the path of a .jsonl or "
                     "text file.")
  lines = file.read_text(encoding="utf-8").splitlines()
  texts = _jsonl_texts(lines, path) if file.suffix == ".jsonl" else [
      {"inputs": line} for line in lines if line.strip()]
  if not texts:
    raise ValueError(f"input file {path!r} holds no inputs; write one input per line.")
  leading = [paradigm_token_id(vocabulary, mode_token)] if mode_token else []
  examples = []
  for text in texts:
    example = {}
    for key, value in text.items():
      ids = (leading if key == "inputs" else []) + vocabulary.encode(value)
      length = _length(task_feature_lengths, key, path)
      if causal_prompt and key == "inputs":
        example["prompt"] = np.asarray(ids[:length], np.int32)
        cut = len(ids) > length
      else:
        example[key] = _append_eos_after_trim(ids, length, vocabulary.eos_id)
        cut = len(ids) > length - 1
      example[f"{key}_pretokenized"] = value
      if cut:
        example.setdefault("truncated", []).append(key)
    examples.append(example)
  return examples


def _jsonl_texts(lines: list[str], path: str) -> list[dict[str, str]]:
  """'inputs' (and 'targets' where given) of each non-blank JSONL line."""
  texts = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {number} is not JSON ({e.msg}); write one JSON object "
                       "per line.") from None
    if not isinstance(record, dict) or not isinstance(record.get("inputs"), str):
      raise ValueError(f"{path} line {number} has no 'inputs' string; write e.g. "
                       '{"inputs": "...", "targets": "..."}.')
    targets = record.get("targets")
    if targets is not None and not isinstance(targets, str):
      raise ValueError(f"{path} line {number} has 'targets' {targets!r}, not a string; "
                       "write the targets as a string or leave them out.")
    texts.append({k: record[k] for k in ("inputs", "targets") if k in record})
  return texts


def _length(task_feature_lengths: Mapping[str, int], key: str, path: str) -> int:
  if key not in task_feature_lengths:
    raise ValueError(f"{path} has {key!r} but task_feature_lengths {dict(task_feature_lengths)} "
                     f"give no length for it; add {key!r}.")
  return task_feature_lengths[key]


def _append_eos_after_trim(ids: list[int], length: int, eos_id: int) -> np.ndarray:
  """int32 [<= length]: `ids` cut to `length - 1`, then EOS (seqio's append_eos_after_trim)."""
  return np.asarray(ids[:length - 1] + [eos_id], np.int32)


def _padded(ids: np.ndarray, length: int, what: str) -> np.ndarray:
  """int32 [length]: `ids` then zeros."""
  if len(ids) > length:
    raise ValueError(f"{what} has {len(ids)} tokens, more than its length {length}; raise "
                     "task_feature_lengths or truncate the example (task_examples and "
                     "file_examples do).")
  out = np.zeros(length, np.int32)
  out[:len(ids)] = ids
  return out


def _batches(rows: Sequence[Batch], batch_size: int) -> Iterator[tuple[Batch, int]]:
  """Stacks `rows` (dicts of [len] arrays) into [batch_size, len] batches; the last is
  filled with all-zero rows. Yields (batch, number of real rows)."""
  if batch_size < 1:
    raise ValueError(f"batch_size {batch_size} must be at least 1.")
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    yield {key: np.stack([row[key] for row in chunk]
                         + [np.zeros_like(chunk[0][key])] * (batch_size - len(chunk)))
           for key in chunk[0]}, len(chunk)


def _inputs(example: Example, architecture: str) -> np.ndarray:
  if "inputs" not in example:
    raise ValueError(f"architecture {architecture!r} needs examples with 'inputs'; this one "
                     f"has {sorted(example)}.")
  return example["inputs"]


def _prompt(example: Example, architecture: str, inputs_length: int) -> Batch:
  """One row of `predict_batches`."""
  if architecture == "encoder_decoder":
    inputs = _inputs(example, architecture)
  else:
    inputs = example.get("inputs", example.get("prompt", np.zeros([0], np.int32)))
  # A prefix LM reads its inputs (and the position after them) bidirectionally, as
  # seqio marks them in training; a causal LM (no inputs, or a 'prompt') reads nothing
  # bidirectionally.
  return prompt_features(architecture, _padded(inputs, inputs_length, "inputs"), np,
                         causal="inputs" not in example)


def predict_batches(examples: Sequence[Example], *, architecture: str,
                    task_feature_lengths: Mapping[str, int],
                    batch_size: int) -> Iterator[tuple[Batch, int]]:
  """(batch of int32 arrays, real rows) of prompts for decoding; the last batch is filled
  with all-zero rows up to `batch_size`.

  Each row as `model.contract.prompt_features` lays it out ([b, inputs] encoder inputs,
  or a decoder-only prompt [b, 1 + inputs]); a prefix LM's bidirectional prefix is its
  inputs, and examples without inputs are a causal LM's (a 'prompt' of `file_examples`
  is laid out like inputs but read causally).
  """
  contract_for(architecture)  # raises for an unknown architecture
  inputs_length = task_feature_lengths.get("inputs", 0)
  rows = [_prompt(ex, architecture, inputs_length) for ex in examples]
  return _batches(rows, batch_size)


def _segments(stack: str, tokens: np.ndarray) -> Batch:
  """`pipeline._with_segment_ids` for one row."""
  segment_ids, positions = unpacked_segments_positions(tokens, np)
  return {f"{stack}_segment_ids": segment_ids, f"{stack}_positions": positions}


def _teacher_forced(example: Example, architecture: str,
                    task_feature_lengths: Mapping[str, int]) -> Batch:
  """One row of `score_batches`: seqio's unpacked conversion of `example`."""
  if "targets" not in example:
    raise ValueError(f"scoring needs examples with 'targets'; this one has {sorted(example)}.")
  targets = example["targets"]
  row = {}
  prefix = 0
  if architecture == "encoder_decoder":
    row["encoder_input_tokens"] = _padded(_inputs(example, architecture),
                                          task_feature_lengths["inputs"], "inputs")
    row.update(_segments("encoder", row["encoder_input_tokens"]))
    length = task_feature_lengths["targets"]
  elif "inputs" in task_feature_lengths:
    prefix = len(_inputs(example, architecture))
    targets = np.concatenate([example["inputs"], targets])
    length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
  else:
    length = task_feature_lengths["targets"]
  target_tokens = _padded(targets, length, "targets")
  positions = np.arange(length)
  row.update({
      "decoder_target_tokens": target_tokens,
      "decoder_input_tokens": np.concatenate([[0], target_tokens[:-1]]).astype(np.int32),
      "decoder_loss_weights": ((target_tokens != 0) & (positions >= prefix)).astype(np.int32)})
  if architecture == "decoder_only" and "inputs" in task_feature_lengths:
    row["decoder_causal_attention"] = (positions <= prefix).astype(np.int32)
  row.update(_segments("decoder", target_tokens))
  return row


def score_batches(examples: Sequence[Example], *, architecture: str,
                  task_feature_lengths: Mapping[str, int],
                  batch_size: int) -> Iterator[tuple[Batch, int]]:
  """(batch of int32 arrays, real rows) of teacher-forced features for scoring the
  examples' targets: what `pipeline.get_dataset(..., pack=False)` gives for them, i.e.
  seqio's EncDec / PrefixLM / LM converter unpacked plus `*_segment_ids` and
  `*_positions`, each [b, feature_lengths_for(architecture, task_feature_lengths)[key]].
  The last batch is filled with all-zero rows (loss weight 0) up to `batch_size`.
  """
  contract_for(architecture)  # raises for an unknown architecture
  rows = [_teacher_forced(ex, architecture, task_feature_lengths) for ex in examples]
  return _batches(rows, batch_size)


def postprocess_and_evaluate(name: str, examples: Sequence[Example],
                             predictions: Sequence[str],
                             metric_fns=None) -> tuple[list[Any], dict[str, Any]]:
  """(postprocessed predictions, metrics) of decoded `predictions`, one per example.

  Predictions go through task `name`'s `postprocess_fn(..., is_target=False)`, targets
  (`targets_pretokenized`) through it with `is_target=True`, then each of the task's
  `metric_fn(targets, predictions)` (or of `metric_fns` when given). Metrics are {} when
  there are none or no example has targets.
  """
  task = _task(name)
  if len(predictions) != len(examples):
    raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples; "
                     "pass one prediction per example.")
  processed = [task.postprocess_fn(p, example=ex, is_target=False)
               for p, ex in zip(predictions, examples)]
  with_targets = sum("targets_pretokenized" in ex for ex in examples)
  metric_fns = task.predict_metric_fns if metric_fns is None else metric_fns
  if not metric_fns or not with_targets:
    return processed, {}
  if with_targets < len(examples):
    raise ValueError(f"{len(examples) - with_targets} of {len(examples)} examples have no "
                     "targets; metrics need a target for every example (add 'targets').")
  targets = [task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
             for ex in examples]
  metrics = {}
  for metric_fn in metric_fns:
    metrics.update(metric_fn(targets, processed))
  return processed, metrics


def write_jsonl_atomically(path: str, rows: list[dict], overwrite: bool = False) -> None:
  """Writes rows as JSONL through a temporary file renamed into place, so a failure
  leaves nothing partial; refuses to replace an existing file unless `overwrite`."""
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"{path} exists; pass --gin.infer.overwrite=True or another "
                     "INFER_OUTPUT_DIR to replace it.")
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  except OSError as e:
    raise ValueError(f"cannot write to {directory} ({e.strerror}); choose a writable "
                     "INFER_OUTPUT_DIR.") from None
  with os.fdopen(fd, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
