"""Jitted decoding and scoring of batches with a `Setup`'s model, on its mesh.

Decoding runs the model's key/value cache (`model.init_decoding` / `model.decode`)
under a search of model/decoding.py; `cached=False` is its reference twin, which
recomputes the whole sequence at every step and reads the logits at the row's position.
"""

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from ul2x import partitioning
from ul2x.model import cache as kv_cache
from ul2x.model import decoding
from ul2x.model.contract import LOSS_WEIGHTS, STACK_TOKENS, TARGETS

METHODS = ("greedy", "sample", "beam")


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
