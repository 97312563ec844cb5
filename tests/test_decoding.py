"""Decoding searches against a toy model whose logits depend on token, position and history."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2x.model import decoding

VOCAB, LEN, BATCH, EOS = 8, 10, 8, 1
# Seed chosen so greedy decoding ends rows 0, 2, 4, 5, 6 early with EOS and never ends rows
# 1, 3, 7; row 7 has EOS as its runner-up at some step, so a beam search of size 1 that let
# any EOS candidate finish would not be greedy.
_rng = np.random.default_rng(10)
BIGRAM = (1.5 * _rng.normal(size=(VOCAB, VOCAB))).astype(np.float32)
POSITIONAL = _rng.normal(size=(LEN, VOCAB)).astype(np.float32)
MIX = _rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
INIT_STATE = _rng.normal(size=(BATCH, VOCAB)).astype(np.float32)
FIRST = _rng.integers(2, VOCAB, size=BATCH).astype(np.int32)
EARLY_ROWS = np.array([0, 2, 4, 5, 6])
# Every search here is tiny, so XLA's compile time dominates the suite; level 0 halves it.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def toy_step(tokens, index, state, xp=jnp):
  """-> (logits, next state), in jax or (xp=np) numpy. The state sums the history, so a beam
  fed another beam's cache gets different logits."""
  logits = xp.asarray(BIGRAM)[tokens] + xp.asarray(POSITIONAL)[index] + state
  return logits, 0.5 * state + xp.asarray(MIX)[tokens]


def toy_logits(tokens, cache):
  """cache: {'index': int32 [batch], 'state': float32 [batch, vocab]}."""
  logits, state = toy_step(tokens, cache["index"], cache["state"])
  return logits, {"index": cache["index"] + 1, "state": state}


def toy_logits_axis1(tokens, cache):
  """The same model with the state stored batch-second: {'layers': {'state': [vocab, batch]}}."""
  logits, state = toy_step(tokens, cache["index"], cache["layers"]["state"].T)
  return logits, {"index": cache["index"] + 1, "layers": {"state": state.T}}


def toy_cache(rows=slice(None)):
  state = INIT_STATE[rows]
  return {"index": np.zeros(len(state), np.int32), "state": state}


def log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def path_log_probs(row, tokens):
  """Numpy log-probs of `tokens` continuing row `row`, through the first EOS; asserts every
  position after that EOS is 0."""
  state, prev, out = INIT_STATE[row], FIRST[row], []
  for index, token in enumerate(tokens):
    logits, state = toy_step(prev, index, state, np)
    out.append(log_softmax(logits)[token])
    prev = token
    if token == EOS:
      assert not np.any(tokens[index + 1:]), tokens
      break
  return np.array(out)


def numpy_greedy(row):
  """-> (tokens [LEN], score) by a plain loop of argmaxes."""
  state, prev, tokens, score = INIT_STATE[row], FIRST[row], np.zeros(LEN, np.int32), 0.0
  for index in range(LEN):
    logits, state = toy_step(prev, index, state, np)
    prev = tokens[index] = np.argmax(logits)
    score += log_softmax(logits)[prev]
    if prev == EOS:
      break
  return tokens, score


@functools.cache
def jitted(search, **options):
  return jit(functools.partial(search, toy_logits, eos_id=EOS, **options))


def sample(cache, first, key, max_decode_len=LEN, **options):
  return jitted(decoding.temperature_sample, max_decode_len=max_decode_len, **options)(
      cache, first, key=key)


def greedy():
  return jitted(decoding.greedy_decode, max_decode_len=LEN)(toy_cache(), FIRST)


def step_counter():
  """A toy_logits that counts its calls, so a test can see the loop stop early."""
  calls = []

  def counted(tokens, cache):
    jax.debug.callback(lambda: calls.append(None))
    return toy_logits(tokens, cache)
  return counted, calls


def test_greedy_is_the_argmax_chain_and_stops_at_eos():
  tokens, scores = greedy()
  expected = [numpy_greedy(row) for row in range(BATCH)]
  np.testing.assert_array_equal(tokens, np.stack([t for t, _ in expected]))
  np.testing.assert_allclose(scores, [s for _, s in expected], rtol=1e-5)
  finished = (np.asarray(tokens) == EOS).any(axis=1)
  assert finished[EARLY_ROWS].all() and finished.sum() == len(EARLY_ROWS)


def test_greedy_loop_stops_when_every_row_has_finished():
  counted, calls = step_counter()
  tokens, _ = jit(functools.partial(decoding.greedy_decode, counted, max_decode_len=LEN,
                                        eos_id=EOS))(toy_cache(EARLY_ROWS), FIRST[EARLY_ROWS])
  jax.effects_barrier()
  longest = max(int(np.argmax(np.asarray(t) == EOS)) + 1 for t in tokens)
  assert longest < LEN and len(calls) == longest


def test_sampling_is_seeded_with_the_key_folded_with_the_step():
  first, again, other = (sample(toy_cache(), FIRST, jax.random.key(seed), temperature=1.0)[0]
                         for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert np.any(np.asarray(first) != np.asarray(other))
  # Step by step outside the loop: each draw is categorical(fold_in(key, step), logits).
  @jit
  def draw(last, cache, step):
    logits, cache = toy_logits(last, cache)
    return jax.random.categorical(jax.random.fold_in(jax.random.key(0), step), logits), cache

  cache, last, done = toy_cache(), jnp.asarray(FIRST), np.zeros(BATCH, bool)
  for step in range(LEN):
    last, cache = draw(last, cache, step)
    np.testing.assert_array_equal(np.asarray(first[:, step])[~done], np.asarray(last)[~done])
    done |= np.asarray(last) == EOS
  assert done.any() and not done.all()


@pytest.mark.parametrize("options", [dict(temperature=1.0),
                                     dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_sample_scores_are_unmodified_log_probs(options):
  tokens, scores = sample(toy_cache(), FIRST, jax.random.key(2), **options)
  expected = [path_log_probs(row, np.asarray(tokens[row])).sum() for row in range(BATCH)]
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  assert np.any(np.asarray(tokens) != np.asarray(greedy()[0])), "sampled like argmax"


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_reduced_to_one_token_is_greedy(options):
  tokens, scores = sample(toy_cache(), FIRST, jax.random.key(3), **options)
  greedy_tokens, greedy_scores = greedy()
  np.testing.assert_array_equal(tokens, greedy_tokens)
  np.testing.assert_allclose(scores, greedy_scores, rtol=1e-6)


def expected_first_token_probs(temperature, top_k, top_p):
  """Numpy reference of the truncated sampling distribution of row 0's first token."""
  logits = toy_step(FIRST[0], 0, INIT_STATE[0], np)[0] / temperature
  order = np.argsort(-logits)
  if top_k:
    logits[order[top_k:]] = -np.inf
  probs = np.exp(log_softmax(logits))
  mass_before = np.cumsum(probs[order]) - probs[order]
  probs[order[mass_before >= top_p]] = 0.0
  return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 2, 1.0), (2.0, 0, 0.5)])
def test_truncated_sampling_frequencies(temperature, top_k, top_p):
  samples = 4000
  cache = decoding.repeat_batch(toy_cache([0]), samples)
  tokens, _ = sample(cache, np.full(samples, FIRST[0]), jax.random.key(4), max_decode_len=1,
                     temperature=temperature, top_k=top_k, top_p=top_p)
  frequencies = np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB) / samples
  expected = expected_first_token_probs(temperature, top_k, top_p)
  assert 2 <= np.count_nonzero(expected) < VOCAB - 3
  np.testing.assert_array_equal(frequencies > 0, expected > 0)
  np.testing.assert_allclose(frequencies, expected, atol=0.03)


def check_beams(tokens, scores, alpha, rows=range(BATCH)):
  """Every returned beam of toy rows `rows` rescored in numpy; empty finished slots are
  zeros at NEG_INF."""
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert np.all(np.diff(scores, axis=1) <= 0), scores
  for row, row_tokens, row_scores in zip(rows, tokens, scores):
    real = row_scores > decoding.NEG_INF
    assert len(np.unique(row_tokens[real], axis=0)) == real.sum(), row_tokens
    assert not row_tokens[~real].any()
    for beam, score in zip(row_tokens[real], row_scores[real]):
      log_probs = path_log_probs(row, beam)
      penalty = decoding.brevity_penalty(alpha, len(log_probs))
      np.testing.assert_allclose(score, log_probs.sum() / penalty, rtol=1e-5)


def test_beam_size_1_is_greedy():
  tokens, scores = jitted(decoding.beam_search, beam_size=1, max_decode_len=LEN, alpha=0.0)(
      toy_cache(), FIRST)
  greedy_tokens, greedy_scores = greedy()
  np.testing.assert_array_equal(tokens[:, 0], greedy_tokens)
  np.testing.assert_allclose(scores[:, 0], greedy_scores, rtol=1e-6)


def test_beam_search_beats_greedy_and_rescores_exactly():
  alpha = 0.6  # beam_search's default
  tokens, scores = jitted(decoding.beam_search, beam_size=4, max_decode_len=LEN)(
      toy_cache(), FIRST)
  check_beams(tokens, scores, alpha)
  greedy_tokens, greedy_scores = greedy()
  lengths = [len(path_log_probs(row, np.asarray(t))) for row, t in enumerate(greedy_tokens)]
  greedy_normalized = np.asarray(greedy_scores) / decoding.brevity_penalty(alpha,
                                                                           np.array(lengths))
  assert np.all(scores[:, 0] >= greedy_normalized - 1e-6)
  assert np.any(scores[:, 0] > greedy_normalized + 1e-3)
  # Rows 1 and 3 end no beam by max_decode_len, so their alive beams come back; row 7 ends
  # only one, and its other slots are empty, as in T5X.
  ended = np.any(np.asarray(tokens) == EOS, axis=2)
  assert not ended[[1, 3]].any() and ended[7].tolist() == [True, False, False, False]
  assert np.sum(np.asarray(scores[7]) == decoding.NEG_INF) == 3


def test_beam_search_stops_early():
  counted, calls = step_counter()
  tokens, scores = jit(functools.partial(
      decoding.beam_search, counted, beam_size=4, max_decode_len=LEN, eos_id=EOS, alpha=0.0))(
          toy_cache(EARLY_ROWS), FIRST[EARLY_ROWS])
  jax.effects_barrier()
  assert len(calls) < LEN
  assert np.all(np.any(np.asarray(tokens) == EOS, axis=2))
  check_beams(tokens, scores, 0.0, EARLY_ROWS)


def test_beam_search_reorders_cache_along_each_leafs_batch_axis():
  cache = toy_cache()
  cache_axis1 = {"index": cache["index"], "layers": {"state": cache["state"].T}}
  axes = {"index": 0, "layers": 1}
  repeated = decoding.repeat_batch(cache_axis1, 3, axes)
  np.testing.assert_array_equal(repeated["layers"]["state"], np.repeat(INIT_STATE.T, 3, axis=1))
  expected = jitted(decoding.beam_search, beam_size=4, max_decode_len=LEN)(cache, FIRST)
  actual = jit(functools.partial(decoding.beam_search, toy_logits_axis1, beam_size=4,
                                 max_decode_len=LEN, eos_id=EOS, cache_axes=axes))(
                                     cache_axis1, FIRST)
  np.testing.assert_array_equal(actual[0], expected[0])
  np.testing.assert_allclose(actual[1], expected[1], rtol=1e-6)
