"""The one decoding module: jitted decoding and scoring of prompt batches with a `Setup`'s
model on its mesh, run over examples for the infer and eval jobs, lm-eval and the
training loop's evaluation (`Evaluator`).

Decoding runs the model's key/value cache (`model.init_decoding` / `model.decode`)
under a search of model/decoding.py; `cached=False` is its reference twin, which
recomputes the whole sequence at every step and reads the logits at the row's position.
Examples (tasks/inference.py, seqio) are imported where they are read: the export job
imports this module for `make_predict_fn` alone, without seqio.
"""

import functools
import sys
import time

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from ul2x import partitioning
from ul2x.model import decoding, kv_cache
from ul2x.model.contract import LOSS_WEIGHTS, STACK_TOKENS, TARGETS
from ul2x.trainer.console import say
from ul2x.trainer.setup import Setup

METHODS = ("greedy", "sample", "beam")
MODES = ("predict", "score")  # run_examples: decode, or score given targets


def _cached(graphdef, params, batch, max_decode_len: int):
  """-> (tokens_to_logits, cache, first tokens) with the model's cache."""
  cache, first = nnx.merge(graphdef, params).init_decoding(batch, max_decode_len)

  def tokens_to_logits(tokens, cache):
    # A model merged inside the loop's trace: MoE layers sow their router stats into it.
    logits, cache = nnx.merge(graphdef, params).decode(tokens[:, None], cache)
    return logits[:, 0], cache

  return tokens_to_logits, cache, first


def _uncached(graphdef, cfg, params, batch, max_decode_len: int):
  """The reference twin of `_cached`: the cache is the token sequence so far, and each
  step runs the full model over it (no key/value cache)."""
  if cfg.architecture == "encoder_decoder":
    b = batch[STACK_TOKENS["encoder"]].shape[0]
    tokens = jnp.zeros((b, max_decode_len), jnp.int32)
    index, fixed = jnp.zeros((b,), jnp.int32), dict(batch)
    first = jnp.zeros((b,), jnp.int32)
  else:
    prompt, seg = batch["decoder_input_tokens"], batch["decoder_segment_ids"]
    pad = ((0, 0), (0, max_decode_len))
    tokens = jnp.pad(prompt, pad)
    index = jnp.sum((seg != 0).astype(jnp.int32), axis=1) - 1
    prefix = jnp.pad(batch.get("decoder_causal_attention", jnp.zeros_like(prompt)), pad)
    fixed = {"decoder_causal_attention": prefix}
    first = jnp.take_along_axis(prompt, index[:, None], axis=1)[:, 0]

  def tokens_to_logits(new, state):
    seq = kv_cache.write(state["tokens"], new[:, None], state["index"])
    positions = jnp.broadcast_to(jnp.arange(seq.shape[1], dtype=jnp.int32), seq.shape)
    # TARGETS as well: the model reads it for every stack (contract.STACK_TOKENS).
    full = {**state["fixed"], "decoder_input_tokens": seq, TARGETS: seq,
            "decoder_positions": positions,
            "decoder_segment_ids": (positions <= state["index"][:, None]).astype(jnp.int32)}
    logits = nnx.merge(graphdef, params)(full)
    logits = jnp.take_along_axis(logits, state["index"][:, None, None], axis=1)[:, 0]
    return logits, dict(state, tokens=seq, index=state["index"] + 1)

  state = {"tokens": tokens, "index": index, "fixed": fixed}
  return tokens_to_logits, state, first


@gin.configurable
def make_predict_fn(job, *, max_decode_len: int, eos_id: int = 1, method: str = "greedy",
                    cached: bool = True, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, beam_size: int = 4, alpha: float = 0.6):
  """The jitted `predict(params, batch, key) -> (tokens int32 [batch, max_decode_len],
  scores float32 [batch])`: the best beam for 'beam' (length-normalised score), else
  the sum of the tokens' log-probabilities. `key` seeds 'sample' (ignored otherwise).
  batch: as `model.init_decoding` takes it. The search is set from gin, e.g.
  `make_predict_fn.method = 'beam'`, `make_predict_fn.beam_size = 4`."""
  if method not in METHODS:
    raise ValueError(f"decoding method {method!r} is unknown; use one of {METHODS}.")
  if max_decode_len < 1:
    raise ValueError(f"max_decode_len={max_decode_len} must be at least 1; set the decode "
                     "length (e.g. --gin.infer.max_decode_len=64).")

  def predict(params, batch, key):
    with partitioning.axis_rules(job.mesh, job.rules):
      if cached:
        fn, cache, first = _cached(job.graphdef, params, batch, max_decode_len)
      else:
        fn, cache, first = _uncached(job.graphdef, job.cfg, params, batch, max_decode_len)
      common = dict(max_decode_len=max_decode_len, eos_id=eos_id)
      if method == "beam":
        tokens, scores = decoding.beam_search(fn, cache, first, beam_size=beam_size,
                                              alpha=alpha, **common)
        return tokens[:, 0], scores[:, 0]
      if method == "greedy":
        return decoding.greedy_decode(fn, cache, first, **common)
      return decoding.temperature_sample(fn, cache, first, key=key, temperature=temperature,
                                         top_k=top_k, top_p=top_p, **common)

  return jax.jit(predict, in_shardings=(job.shardings["params"], job.batch_sharding, None))


def make_score_fn(job, *, greedy: bool = False):
  """The jitted `score(params, batch) -> float32 [batch]`: each row's log-likelihood of
  its `decoder_target_tokens` (summed over `decoder_loss_weights`), teacher-forced.
  `greedy`: -> (that, bool [batch]: every weighted target is its position's argmax), as
  lm-eval's loglikelihood requests ask."""

  def score(params, batch):
    with partitioning.axis_rules(job.mesh, job.rules):
      logits = nnx.merge(job.graphdef, params)(batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    target = jnp.take_along_axis(log_probs, batch[TARGETS][..., None], axis=-1)[..., 0]
    total = jnp.sum(target * batch[LOSS_WEIGHTS], axis=1)
    if not greedy:
      return total
    best = jnp.argmax(log_probs, axis=-1) == batch[TARGETS]
    return total, jnp.all(best | (batch[LOSS_WEIGHTS] == 0), axis=1)

  return jax.jit(score, in_shardings=(job.shardings["params"], job.batch_sharding))



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
def jitted(job: Setup, mode: str, max_decode_len: int | None = None, greedy: bool = False):
  """One jitted function per job, mode and length, reused by every call (each in-training
  evaluation, each lm-eval batch): `make_predict_fn` decoding `max_decode_len` tokens
  (mode 'predict') or `make_score_fn(greedy=greedy)` ('score')."""
  if mode == "predict":
    return make_predict_fn(job, max_decode_len=max_decode_len)
  return make_score_fn(job, greedy=greedy)


def run_examples(job: Setup, params, examples, *, mode: str, task_feature_lengths: dict,
                 batch_size: int, max_decode_len: int | None = None, seed: int = 0,
                 what: str = "infer") -> list[dict]:
  """Decodes (mode 'predict') or scores ('score') `examples` (tasks.inference format)
  -> per example {'prediction': ids without padding, 'score': float} ('score' only)."""
  from ul2x.tasks import inference
  if mode not in MODES:
    raise ValueError(f"infer.mode={mode!r} is not one of {MODES}.")
  arch = job.cfg.architecture
  if mode == "predict":
    fn = jitted(job, mode, max_decode_len or task_feature_lengths.get("targets"))
    batches = inference.predict_batches(examples, architecture=arch, batch_size=batch_size,
                                        task_feature_lengths=task_feature_lengths)
  else:
    fn = jitted(job, mode)
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


def metric_tasks(name: str, named_metrics: bool = False) -> list[str]:
  """The task `name`, or a mixture's member tasks, that have metric functions (all of
  them when the metrics are named in gin)."""
  from ul2x.tasks import pipeline
  provider = pipeline.mixture_or_task(name)
  tasks = getattr(provider, "tasks", [provider])
  names = [t.name for t in tasks if t.predict_metric_fns or named_metrics]
  if not names:
    raise ValueError(f"{name!r} has no metric functions to evaluate; register the task with "
                     "metric_fns (e.g. register_finetune_task(..., metric_fns=[exact_match])).")
  return names


class Evaluator:
  """Decodes each task's examples with given params and applies the task's metrics: the
  eval job's, and the training loop's every `train.infer_eval_every` steps."""

  def __init__(self, job: Setup, mixture_or_task_name: str, *, split: str,
               task_feature_lengths: dict, batch_size: int, max_decode_len: int | None,
               num_examples: int | None, metric_names=None):
    from ul2x.tasks import inference, metrics
    self.job, self.batch_size, self.lengths = job, batch_size, task_feature_lengths
    self.max_decode_len = max_decode_len
    self.metric_fns = None if metric_names is None else metrics.metric_fns(metric_names)
    self.examples = {t: inference.task_examples(t, split, task_feature_lengths, num_examples)
                     for t in metric_tasks(mixture_or_task_name, metric_names is not None)}

  def __call__(self, params) -> dict[str, float]:
    """-> {'<task>/<metric>': value}."""
    from ul2x.tasks import inference
    results = {}
    for task, examples in self.examples.items():
      decoded = run_examples(self.job, params, examples, mode="predict", what=f"eval {task}",
                             task_feature_lengths=self.lengths, batch_size=self.batch_size,
                             max_decode_len=self.max_decode_len)
      vocabulary = inference.targets_vocabulary(task)
      texts = [inference.decode(r["prediction"], vocabulary) for r in decoded]
      _, values = inference.postprocess_and_evaluate(task, examples, texts, self.metric_fns)
      results.update({f"{task}/{k}": float(v) for k, v in values.items()})
    return results
