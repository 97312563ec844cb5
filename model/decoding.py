"""Decoding searches: temperature sampling, greedy decoding and beam search.

Each search is a pure function over a `tokens_to_logits(tokens, cache) -> (logits, new_cache)`
callback and runs its whole decode loop inside one `lax.while_loop`, so it jits with the
callback closed over. The callback owns the cache (positions included); the search only
carries it, repeats it for beams and reorders it along each leaf's batch axis.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

# Finite rather than -inf so that sums and divisions of dead-beam scores stay finite.
NEG_INF = -1.0e7


def _map_batch_axes(fn, tree, axes):
  """fn(leaf, axis) on every leaf; `axes` is a pytree prefix of `tree` giving batch axes."""
  return jax.tree.map(lambda axis, sub: jax.tree.map(lambda x: fn(x, axis), sub), axes, tree)


def repeat_batch(tree, n: int, axes=0):
  """Repeats every leaf n times along its batch axis, row-major: row r becomes rows
  r*n ... r*n+n-1. `axes` is an int or a pytree prefix of `tree` (see `beam_search`)."""
  return _map_batch_axes(lambda x, axis: jnp.repeat(x, n, axis=axis), tree, axes)


def _truncate(logits, top_k: int, top_p: float):
  """logits: [batch, vocab] -> same, with tokens outside the top-k / top-p set at -inf."""
  rows = jnp.arange(logits.shape[0])[:, None]
  if top_k > 0:
    # Index-based so that ties at the k-th logit still keep exactly k tokens.
    _, kept = lax.top_k(logits, top_k)
    keep = jnp.zeros(logits.shape, bool).at[rows, kept].set(True)
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def temperature_sample(tokens_to_logits: TokensToLogits, cache, first_tokens, *,
                       max_decode_len: int, eos_id: int, key=None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0):
  """Samples up to max_decode_len tokens per row.

  first_tokens: int32 [batch], fed at step 0; step i feeds the token chosen at step i-1.
  temperature 0 is greedy (argmax, ties to the lowest id; `key` unused). Otherwise logits are
  divided by temperature, then cut to the top_k largest (top_k > 0), then to the smallest set
  of most likely tokens whose probability under that distribution reaches top_p (top_p < 1,
  always at least the top token); step i samples with jax.random.fold_in(key, i).
  A row's EOS is kept; every later position is 0 and its score stops changing. The loop stops
  when every row has finished or after max_decode_len steps.

  Returns tokens int32 [batch, max_decode_len] and scores float32 [batch]: the sum over a
  row's tokens (through EOS) of the log-softmax of the UNMODIFIED logits at the chosen token.
  """
  if max_decode_len < 1 or temperature < 0 or top_k < 0:
    raise ValueError(f"need max_decode_len >= 1, temperature >= 0, top_k >= 0; got "
                     f"{max_decode_len}, {temperature}, {top_k}")
  if temperature > 0 and key is None:
    raise ValueError(f"temperature={temperature} samples and needs a `key`; pass "
                     "key=jax.random.key(seed), or temperature=0 for greedy decoding")
  batch = first_tokens.shape[0]

  def choose(logits, step):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _truncate(logits / temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), logits).astype(jnp.int32)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_decode_len) & ~jnp.all(done)

  def body(state):
    step, tokens, last, done, scores, cache = state
    logits, cache = tokens_to_logits(last, cache)
    logits = logits.astype(jnp.float32)
    chosen = choose(logits, step)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done, 0.0, log_prob)
    chosen = jnp.where(done, 0, chosen)
    tokens = lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], step, axis=1)
    return step + 1, tokens, chosen, done | (chosen == eos_id), scores, cache

  state = (jnp.int32(0), jnp.zeros((batch, max_decode_len), jnp.int32),
           first_tokens.astype(jnp.int32), jnp.zeros(batch, bool),
           jnp.zeros(batch, jnp.float32), cache)
  _, tokens, _, _, scores, _ = lax.while_loop(cond, body, state)
  return tokens, scores


def greedy_decode(tokens_to_logits: TokensToLogits, cache, first_tokens, *,
                  max_decode_len: int, eos_id: int):
  """`temperature_sample` with temperature 0: argmax at every step."""
  return temperature_sample(tokens_to_logits, cache, first_tokens,
                            max_decode_len=max_decode_len, eos_id=eos_id, temperature=0.0)


def brevity_penalty(alpha: float, length):
  """T5X's length normalization: a beam's score is its log-prob divided by this."""
  return ((5.0 + length) / 6.0) ** alpha


class _Beams(NamedTuple):
  step: jax.Array             # int32 []
  alive_seq: jax.Array        # int32 [batch, beams, max_decode_len]
  alive_log_probs: jax.Array  # float32 [batch, beams], best first
  alive_last: jax.Array       # int32 [batch, beams]: the token to feed next
  finished_seq: jax.Array     # int32 [batch, beams, max_decode_len]
  finished_scores: jax.Array  # float32 [batch, beams], normalized, best first
  finished_flags: jax.Array   # bool [batch, beams]: the slot holds a finished beam
  cache: Any                  # leaves hold batch*beams rows


def _take_beams(x, index):
  """x: [batch, n, ...], index: [batch, k] -> [batch, k, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(tokens_to_logits: TokensToLogits, cache, first_tokens, *, beam_size: int,
                max_decode_len: int, eos_id: int, alpha: float = 0.6, cache_axes=0):
  """Beam search with T5X's alive / finished beam sets and brevity penalty.

  cache: for `batch` rows; every leaf is repeated beam_size times along its batch axis
  (row r's beams are rows r*beam_size ... r*beam_size+beam_size-1), the callback runs on
  batch*beam_size rows, and each step gathers the surviving beams' rows. cache_axes: an int
  or a pytree prefix of `cache` giving each leaf's batch axis, e.g. {'layers': 1, 'index': 0}.
  first_tokens: int32 [batch].

  Each step expands the alive beams to their 2*beam_size best continuations: the best
  beam_size that are not EOS stay alive; those ending in EOS that rank among the best
  beam_size compete for the finished set, which keeps the beam_size best by score. (Only
  EOS within the beam finishes, as in fairseq, so beam_size 1 with alpha 0 is exactly
  greedy decoding; with alpha > 0 a longer beam may outscore greedy's.) A score is
  log-prob / brevity_penalty(alpha, length), length counting through EOS; alpha >= 0.
  Stops when, in every row, no alive beam can beat the worst finished one, or after
  max_decode_len steps. A row with no finished beam returns its alive beams; a row with
  fewer than beam_size returns them first and fills the other slots, as T5X does, with
  zeros scored NEG_INF.

  Returns tokens int32 [batch, beam_size, max_decode_len] (0 after EOS) and scores float32
  [batch, beam_size], best first.
  """
  if beam_size < 1 or max_decode_len < 1 or alpha < 0:
    raise ValueError(f"need beam_size >= 1, max_decode_len >= 1, alpha >= 0; got "
                     f"{beam_size}, {max_decode_len}, {alpha}")
  batch = first_tokens.shape[0]
  first_rows = jnp.arange(batch)[:, None] * beam_size

  def cond(beams):
    best_possible = beams.alive_log_probs[:, 0] / brevity_penalty(alpha, max_decode_len)
    worst_finished = jnp.where(jnp.all(beams.finished_flags, axis=1),
                               jnp.min(beams.finished_scores, axis=1), NEG_INF)
    return (beams.step < max_decode_len) & ~jnp.all(worst_finished > best_possible)

  def body(beams):
    step = beams.step
    logits, cache = tokens_to_logits(beams.alive_last.reshape(-1), beams.cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beam_size, -1)
    vocab = log_probs.shape[-1]
    if vocab < 2 * beam_size:
      raise ValueError(f"beam_size={beam_size} needs logits over at least 2*beam_size tokens; "
                       f"got {vocab}: lower beam_size")
    candidates = (beams.alive_log_probs[:, :, None] + log_probs).reshape(batch, -1)
    # 2*beam_size candidates hold at least beam_size that are not EOS, to refill the alive set.
    top_log_probs, top_index = lax.top_k(candidates, 2 * beam_size)
    top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seq = lax.dynamic_update_slice_in_dim(
        _take_beams(beams.alive_seq, top_beam), top_token[:, :, None], step, axis=2)
    is_eos = top_token == eos_id

    alive_log_probs, keep = lax.top_k(jnp.where(is_eos, NEG_INF, top_log_probs), beam_size)
    source_rows = (first_rows + _take_beams(top_beam, keep)).reshape(-1)
    cache = _map_batch_axes(lambda x, axis: jnp.take(x, source_rows, axis=axis), cache,
                            cache_axes)

    finishing = is_eos[:, :beam_size]
    new_scores = jnp.where(finishing, top_log_probs[:, :beam_size]
                           / brevity_penalty(alpha, step + 1), NEG_INF)
    finished_scores, best = lax.top_k(
        jnp.concatenate([beams.finished_scores, new_scores], axis=1), beam_size)
    finished_seq = _take_beams(
        jnp.concatenate([beams.finished_seq, top_seq[:, :beam_size]], axis=1), best)
    finished_flags = _take_beams(
        jnp.concatenate([beams.finished_flags, finishing], axis=1), best)
    return _Beams(step + 1, _take_beams(top_seq, keep), alive_log_probs,
                  _take_beams(top_token, keep), finished_seq, finished_scores,
                  finished_flags, cache)

  # All beams of a row start identical, so only beam 0 may expand at the first step.
  alive_log_probs = jnp.where(jnp.arange(beam_size) == 0, 0.0, NEG_INF).astype(jnp.float32)
  empty_seq = jnp.zeros((batch, beam_size, max_decode_len), jnp.int32)
  beams = _Beams(
      jnp.int32(0), empty_seq, jnp.tile(alive_log_probs, (batch, 1)),
      jnp.repeat(first_tokens.astype(jnp.int32)[:, None], beam_size, axis=1), empty_seq,
      jnp.full((batch, beam_size), NEG_INF, jnp.float32), jnp.zeros((batch, beam_size), bool),
      repeat_batch(cache, beam_size, cache_axes))
  beams = lax.while_loop(cond, body, beams)

  # The loop only ends with a row unfinished at max_decode_len, so alive beams have that length.
  any_finished = jnp.any(beams.finished_flags, axis=1)
  tokens = jnp.where(any_finished[:, None, None], beams.finished_seq, beams.alive_seq)
  scores = jnp.where(any_finished[:, None], beams.finished_scores,
                     beams.alive_log_probs / brevity_penalty(alpha, max_decode_len))
  return tokens, scores
