"""The infer job: predictions (decoding) or scores (log-likelihood of given targets) for a
seqio task split or a text / JSONL file of inputs, written as JSONL."""

import ast
import functools
import json
import os
import sys
import tempfile
import time

import gin
import jax

from ul2x.model import TransformerConfig
from ul2x.tasks import inference, pipeline, preprocessors
from ul2x.trainer import checkpoints, record
from ul2x.trainer.console import say
from ul2x.trainer.predict import make_predict_fn, make_score_fn
from ul2x.trainer.setup import Setup, setup

MODES = ("predict", "score")
# infer.mode_token's default: the mode token of the task the checkpoint was trained on.
TRAINED_MODE_TOKEN = "auto"


class ProgressBar:
  """`done/total examples  rate  ETA` on one updating line; off a tty (a log file), the
  last line only, and one a minute before it on long runs."""

  LOG_EVERY_S = 60.0

  def __init__(self, total: int, what: str):
    self.total, self.what = total, what
    self.start = self.shown = time.perf_counter()
    self.tty = sys.stdout.isatty()

  def update(self, done: int):
    now = time.perf_counter()
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    if not self.tty and done < self.total and now - self.shown < self.LOG_EVERY_S:
      return
    self.shown = now
    start = "\r" if self.tty else ""
    say(f"{start}{self.what} {done}/{self.total}  {rate:.1f} ex/s  "
        f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        end="" if self.tty and done < self.total else "\n")


@functools.lru_cache(maxsize=16)
def _jitted(job: Setup, mode: str, max_decode_len: int | None):
  """One compiled function per job and mode, reused by every call (e.g. each in-training
  evaluation)."""
  if mode == "predict":
    return make_predict_fn(job, max_decode_len=max_decode_len)
  return make_score_fn(job)


def run_examples(job: Setup, params, examples, *, mode: str, task_feature_lengths: dict,
                 batch_size: int, max_decode_len: int | None = None, seed: int = 0,
                 what: str = "infer") -> list[dict]:
  """Decodes (mode 'predict') or scores ('score') `examples` (tasks.inference format)
  -> per example {'prediction': ids without padding, 'score': float} ('score' only)."""
  if mode not in MODES:
    raise ValueError(f"infer.mode={mode!r} is not one of {MODES}.")
  arch = job.cfg.architecture
  if mode == "predict":
    fn = _jitted(job, mode, max_decode_len or task_feature_lengths.get("targets"))
    batches = inference.predict_batches(examples, architecture=arch, batch_size=batch_size,
                                        task_feature_lengths=task_feature_lengths)
  else:
    fn = _jitted(job, mode, None)
    batches = inference.score_batches(examples, architecture=arch, batch_size=batch_size,
                                      task_feature_lengths=task_feature_lengths)
  results, bar, key = [], ProgressBar(len(examples), what), jax.random.key(seed)
  for i, (batch, rows) in enumerate(batches):
    batch = job.global_batch(batch)
    if mode == "predict":
      tokens, scores = jax.device_get(fn(params, batch, jax.random.fold_in(key, i)))
      results += [{"prediction": _until_eos(t), "score": float(s)}
                  for t, s in zip(tokens[:rows], scores[:rows])]
    else:
      results += [{"score": float(s)} for s in jax.device_get(fn(params, batch))[:rows]]
    bar.update(len(results))
  return results


def _until_eos(tokens) -> list[int]:
  tokens = [int(t) for t in tokens]
  return tokens[:tokens.index(1) + 1] if 1 in tokens else tokens


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


def _config_bindings(path: str) -> dict:
  """{'name': value} of the top-level bindings and macros in a gin file as training writes
  it (`gin.config_str()`, one per line); a value that is not a Python literal (a
  `%MACRO` or `@reference`, a value spread over lines) is kept as its text."""
  bindings = {}
  with open(path) as f:
    for line in f:
      name, sep, value = line.rstrip("\n").partition(" = ")
      if sep and name and not name[0].isspace() and not name.startswith("#"):
        try:
          bindings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
          bindings[name] = value
  return bindings


def _task_mode_token(task, gin_token: str | None) -> str | None:
  """The mode token that leads `task`'s inputs: fixed by its registration
  (`register_finetune_task(..., mode_token=)`, a UL2 denoiser's `paradigm_token`) or,
  for a bare `prepend_mode_token`, `gin_token`, the one training chose in gin."""
  for fn in task.preprocessors:
    if fn is preprocessors.prepend_mode_token:
      return gin_token
    keywords = getattr(fn, "keywords", {})
    token = keywords.get("mode_token") or keywords.get("paradigm_token")
    if token:
      return token
  return None


def task_mode_tokens(provider, gin_token: str | None) -> set:
  """The mode tokens that lead the inputs of a task or a mixture's tasks (None: none)."""
  return {_task_mode_token(t, gin_token) for t in getattr(provider, "tasks", [provider])}


def trained_mode_token(checkpoint_path: str, step: int | None = None) -> str | None:
  """The mode token of the task or mixture the checkpoint was trained on, as its record
  (trainer/record.py) or, for older checkpoints, its MODEL_DIR/config.gin names it, said
  on the console; None if the task had none, or if there is neither file or the task is
  not registered and chose no token in gin."""
  saved = record.read(checkpoint_path, step)
  if saved is not None:
    if not saved.task:
      return None
    return _said_mode_token(saved.task, set(saved.mode_tokens) or {None})
  directory, _ = checkpoints.find_checkpoint(checkpoint_path, step)
  if os.path.basename(directory) == "checkpoints":
    directory = os.path.dirname(directory)  # the MODEL_DIR
  config = os.path.join(directory, "config.gin")
  if not os.path.isfile(config):
    return None
  bindings = _config_bindings(config)
  name = bindings.get("train.mixture_or_task_name")
  if isinstance(name, str) and name.startswith("%"):
    name = bindings.get(name[1:])
  if not isinstance(name, str):
    return None
  gin_token = bindings.get("prepend_mode_token.mode_token")
  try:
    provider = pipeline.mixture_or_task(name)
  except ValueError:
    if gin_token is None:
      return None
    raise ValueError(
        f"the checkpoint was trained on {name!r} with prepend_mode_token.mode_token="
        f"{gin_token!r} ({config}), but {name!r} is not registered here; add the gin file "
        f"that imports the module registering it, or pass --gin.infer.mode_token=\"'{gin_token}'\" "
        "(or =None for no mode token).") from None
  return _said_mode_token(name, task_mode_tokens(provider, gin_token))


def _said_mode_token(name: str, tokens: set) -> str | None:
  if tokens == {None}:
    return None
  if len(tokens) > 1:
    say(f"infer: {name!r}, which the checkpoint was trained on, leads its inputs with "
        f"{', '.join(sorted(t or 'none' for t in tokens))}; prompts get no mode token unless "
        "--gin.infer.mode_token names one")
    return None
  token, = tokens
  say(f"infer: prompts get the mode token {token!r} of {name!r}, which the checkpoint was "
      "trained on; pass --gin.infer.mode_token=... (None for none) to change it")
  return token


def _say_truncated(examples: list[dict], task_feature_lengths: dict) -> None:
  """One line, where any input file's texts were cut to their feature length."""
  counts = {}
  for example in examples:
    for key in example.get("truncated", ()):
      counts[key] = counts.get(key, 0) + 1
  if counts:
    cut = ", ".join(f"{n} of {len(examples)} {key} (to {task_feature_lengths[key]} tokens)"
                    for key, n in counts.items())
    say(f"infer: cut to TASK_FEATURE_LENGTHS: {cut}; their rows say \"truncated\"; raise "
        "--gin.TASK_FEATURE_LENGTHS to keep them whole")


@gin.configurable
def infer(*, checkpoint_path: str, output_dir: str, task_feature_lengths: dict | None = None,
          mixture_or_task_name: str | None = None, input_file: str | None = None,
          model_config: TransformerConfig | None = None, mode: str = "predict",
          split: str = "validation", batch_size: int = 32, max_decode_len: int | None = None,
          num_examples: int | None = None, mode_token: str | None = TRAINED_MODE_TOKEN,
          seed: int = 0, step: int | None = None, overwrite: bool = False,
          causal_prompt: bool = False, mesh=None) -> str:
  """Writes `output_dir/<task or file name>-<mode>-<step>.jsonl`, one row per example:
  `inputs`, `prediction` (predict) or `targets` (score), and `score` (the prediction's
  log-probability, or the given targets' log-likelihood). Inputs come from the task's
  `split` or from `input_file` (.jsonl with 'inputs' [and 'targets'], else one input per
  line) led by `mode_token` ('[NLU]', '[NLG]', '[S2S]', None for none, or by default
  that of the task the checkpoint was trained on: `trained_mode_token`); `causal_prompt`
  continues each line as plain text with a decoder-only causal LM (no EOS after it, no
  bidirectional prefix). Returns the output path."""
  if mode not in MODES:
    raise ValueError(f"infer.mode={mode!r} is not one of {MODES}; use --gin.infer.mode.")
  if bool(mixture_or_task_name) == bool(input_file):
    raise ValueError("give exactly one of MIXTURE_OR_TASK_NAME and INPUT_FILE (now "
                     f"{mixture_or_task_name!r} and {input_file!r}).")
  if max_decode_len is not None and max_decode_len < 1:
    raise ValueError(f"infer.max_decode_len={max_decode_len} must be at least 1.")
  model_config = record.model_config(checkpoint_path, model_config, step=step)
  task_feature_lengths = record.task_feature_lengths(checkpoint_path, task_feature_lengths)
  if input_file:
    if causal_prompt and (mode == "score" or model_config.architecture != "decoder_only"):
      raise ValueError("infer.causal_prompt=True continues text with a decoder_only model in "
                       f"predict mode, not {model_config.architecture!r} in {mode!r} mode.")
    if mode_token == TRAINED_MODE_TOKEN:
      mode_token = trained_mode_token(checkpoint_path, step)
    saved = record.read(checkpoint_path, step)  # its vocabulary; bytes for older runs
    vocabulary = saved.seqio_vocabulary() if saved else None
    examples = inference.file_examples(input_file, mode_token=mode_token,
                                       task_feature_lengths=task_feature_lengths,
                                       causal_prompt=causal_prompt, vocabulary=vocabulary)
    name = os.path.splitext(os.path.basename(input_file))[0]
    if mode == "score" and any("targets" not in e for e in examples):
      raise ValueError(f"infer.mode='score' needs 'targets' on every line of {input_file}.")
  else:
    examples = inference.task_examples(mixture_or_task_name, split, task_feature_lengths,
                                       num_examples)
    vocabulary = inference.targets_vocabulary(mixture_or_task_name)
    name = f"{mixture_or_task_name}-{split}"
  examples = examples[:num_examples] if num_examples else examples
  job = setup(model_config, mesh=mesh)
  state = job.restore_state(checkpoint_path, step)
  at = int(state["step"])
  path = os.path.join(output_dir, f"{name}-{mode}-{at}.jsonl")
  if os.path.exists(path) and not overwrite:  # before any decoding work
    raise ValueError(f"{path} exists; pass --gin.infer.overwrite=True or another "
                     "INFER_OUTPUT_DIR to replace it.")
  say(f"{mode}: {len(examples)} examples of {name} with the checkpoint at step {at}")
  _say_truncated(examples, task_feature_lengths)
  results = run_examples(job, state["params"], examples, mode=mode, seed=seed,
                         task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                         max_decode_len=max_decode_len)
  rows = []
  for example, result in zip(examples, results):
    row = {"inputs": example.get("inputs_pretokenized", "")}
    if "targets_pretokenized" in example:
      row["targets"] = example["targets_pretokenized"]
    if mode == "predict":
      row["prediction"] = inference.decode(result["prediction"], vocabulary)
    row["score"] = result["score"]
    if example.get("truncated"):
      row["truncated"] = example["truncated"]
    rows.append(row)
  if jax.process_index() == 0:
    write_jsonl_atomically(path, rows, overwrite)
  say(f"wrote {len(rows)} rows to {path}")
  return path
