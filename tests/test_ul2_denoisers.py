"""The seven UL2 denoisers over 10,000 examples each, and the mixture's shares.

Examples come straight from the registered member tasks (`ul2x_ul2_<denoiser>`),
unshuffled, so the k-th example is the k-th chunk of the corpus token stream; all
checks are vectorized in numpy.
"""

import collections

import gin
import numpy as np
import pytest
import seqio

import ul2x.tasks
from ul2x.tasks import corpus, preprocessors, ul2, vocabularies

VOCAB = vocabularies.byte_vocabulary()
LOWEST_SENTINEL = vocabularies.sentinel_id(VOCAB, vocabularies.NUM_SENTINELS - 1)
NUM_EXAMPLES = 10_000
# Per denoiser: feature lengths whose chunks round to the configured statistics
# (T5 rounds noise tokens and spans per chunk), long enough for mu=64 to make spans of
# 64 tokens: chunk length, noise tokens and spans are in the comments.
LENGTHS = {
    "r3_15": {"inputs": 300, "targets": 68},    # 331 tokens, 50 noise in 17 spans
    "r8_15": {"inputs": 140, "targets": 28},    # 159, 24 in 3
    "x3_50": {"inputs": 68, "targets": 68},     # 99, 50 in 17
    "x8_50": {"inputs": 56, "targets": 56},     # 96, 48 in 6
    "x64_15": {"inputs": 728, "targets": 132},  # 852, 128 in 2
    "x64_50": {"inputs": 264, "targets": 264},  # 516, 258 in 4
    "s": {"inputs": 64, "targets": 64},         # 63, cut uniform in [1, 62]
}
DENOISERS = {d.name: d for d in ul2.UL2_DENOISERS}


def _corpus_stream(num_tokens: int) -> np.ndarray:
  """The train split's byte tokens in file order, each paragraph ended by EOS, repeated
  (one epoch per repeat)."""
  epoch = np.concatenate([np.array(VOCAB.encode(line) + [VOCAB.eos_id], np.int32)
                          for line in corpus.corpus_lines("train")])
  return np.tile(epoch, -(-num_tokens // epoch.size))[:num_tokens]


@pytest.fixture(scope="module")
def examples():
  """Denoiser name -> (inputs [N, Li], targets [N, Lt]) int32, zero-padded, EOS included."""
  cache = {}

  def get(name):
    if name not in cache:
      task = seqio.get_mixture_or_task(f"{ul2x.tasks.UL2_MIXTURE_NAME}_{name}")
      ds = task.get_dataset(LENGTHS[name], split="train", shuffle=False, seed=0, num_epochs=None)
      batch = next(ds.take(NUM_EXAMPLES).padded_batch(NUM_EXAMPLES).as_numpy_iterator())
      cache[name] = batch["inputs"], batch["targets"]
    return cache[name]

  return get


def _merge(body_inputs: np.ndarray, body_targets: np.ndarray, num_spans: int) -> np.ndarray:
  """Vectorized undo of span corruption: each row's kept runs (inputs) and noise runs
  (targets) interleaved by sentinel index; sentinels dropped. [N, chunk length]."""
  in_sentinel = body_inputs >= LOWEST_SENTINEL
  target_sentinel = body_targets >= LOWEST_SENTINEL
  keys = np.concatenate([
      np.where(in_sentinel, -1, 2 * np.cumsum(in_sentinel, axis=1)),
      np.where(target_sentinel, -1, 2 * np.cumsum(target_sentinel, axis=1) - 1)], axis=1)
  order = np.argsort(keys, axis=1, kind="stable")
  values = np.take_along_axis(np.concatenate([body_inputs, body_targets], axis=1), order, axis=1)
  return values[:, 2 * num_spans:]


@pytest.mark.parametrize("name", [n for n, d in DENOISERS.items() if d.noise_density])
def test_span_corruption_denoiser(name, examples):
  denoiser, lengths = DENOISERS[name], LENGTHS[name]
  chunk = preprocessors.span_corruption_chunk_length(
      lengths, denoiser.noise_density, denoiser.mean_noise_span_length, denoiser.paradigm_token)
  noise, spans = preprocessors.span_counts(chunk, denoiser.noise_density,
                                           denoiser.mean_noise_span_length)
  inputs, targets = examples(name)
  assert inputs.shape == (NUM_EXAMPLES, chunk - noise + spans + 2) and not (inputs == 0).any()
  assert targets.shape == (NUM_EXAMPLES, noise + spans + 1) and not (targets == 0).any()
  assert inputs.shape[1] <= lengths["inputs"] and targets.shape[1] <= lengths["targets"]
  assert (inputs[:, 0] == vocabularies.paradigm_token_id(VOCAB, denoiser.paradigm_token)).all()
  assert (inputs[:, -1] == VOCAB.eos_id).all() and (targets[:, -1] == VOCAB.eos_id).all()
  body_inputs, body_targets = inputs[:, 1:-1], targets[:, :-1]
  # Sentinels 0, 1, ... in order on both sides; targets start with one; inside, only
  # bytes and the EOS that ends each document.
  expected_sentinels = VOCAB.vocab_size - 1 - np.arange(spans)
  for body in (body_inputs, body_targets):
    is_sentinel = body >= LOWEST_SENTINEL
    assert (is_sentinel.sum(axis=1) == spans).all()
    assert (body[is_sentinel].reshape(-1, spans) == expected_sentinels).all()
    text = body[~is_sentinel]
    assert (((text >= 3) & (text < 259)) | (text == VOCAB.eos_id)).all()
  assert (body_targets[:, 0] >= LOWEST_SENTINEL).all()
  # Span lengths from the sentinel positions in the targets; every span non-empty.
  rows, positions = np.nonzero(body_targets >= LOWEST_SENTINEL)
  bounds = np.concatenate([positions.reshape(-1, spans),
                           np.full((NUM_EXAMPLES, 1), body_targets.shape[1])], axis=1)
  span_lengths = np.diff(bounds, axis=1) - 1
  assert span_lengths.min() >= 1 and (span_lengths.sum(axis=1) == noise).all()
  if spans > 1:
    assert len(np.unique(span_lengths)) > 5  # random segmentation, not fixed lengths
  rate = span_lengths.sum() / (NUM_EXAMPLES * chunk)
  mean_span = span_lengths.mean()
  assert rate == pytest.approx(denoiser.noise_density, rel=0.05)
  assert mean_span == pytest.approx(denoiser.mean_noise_span_length, rel=0.05)
  # Merging back by sentinel gives the k-th chunk of the token stream, exactly.
  merged = _merge(body_inputs, body_targets, spans)
  np.testing.assert_array_equal(merged, _corpus_stream(NUM_EXAMPLES * chunk).reshape(-1, chunk))


def test_prefix_lm_denoiser(examples):
  lengths = LENGTHS["s"]
  chunk, lowest, highest = preprocessors.prefix_lm_split(lengths, "[S2S]")
  inputs, targets = examples("s")
  input_lengths, target_lengths = (inputs > 0).sum(axis=1), (targets > 0).sum(axis=1)
  assert (inputs[:, 0] == vocabularies.paradigm_token_id(VOCAB, "[S2S]")).all()
  assert (input_lengths <= lengths["inputs"]).all() and (target_lengths <= lengths["targets"]).all()
  cuts = input_lengths - 2  # less paradigm token and EOS
  assert cuts.min() == lowest and cuts.max() == highest
  assert (cuts + target_lengths - 1 == chunk).all()
  expected = _corpus_stream(NUM_EXAMPLES * chunk).reshape(-1, chunk)
  for row, (i, t) in enumerate(zip(input_lengths, target_lengths)):
    assert inputs[row, i - 1] == VOCAB.eos_id and targets[row, t - 1] == VOCAB.eos_id
    np.testing.assert_array_equal(
        np.concatenate([inputs[row, 1:i - 1], targets[row, :t - 1]]), expected[row])
  mean_target = chunk - (lowest + highest) / 2
  rate = (target_lengths - 1).sum() / (NUM_EXAMPLES * chunk)
  assert (target_lengths - 1).mean() == pytest.approx(mean_target, rel=0.05)
  assert rate == pytest.approx(mean_target / chunk, rel=0.05)


def _measured_shares(lengths: dict, count: int) -> dict[str, float]:
  """Denoiser -> share of `count` examples of the `ul2x_ul2` mixture (seed 0), each
  identified by paradigm token, lengths and sentinel count (fixed per span denoiser)."""
  signatures = {}
  for name, d in DENOISERS.items():
    if d.noise_density:
      chunk = preprocessors.span_corruption_chunk_length(
          lengths, d.noise_density, d.mean_noise_span_length, d.paradigm_token)
      noise, spans = preprocessors.span_counts(chunk, d.noise_density, d.mean_noise_span_length)
      token = vocabularies.paradigm_token_id(VOCAB, d.paradigm_token)
      signatures[(token, chunk - noise + spans + 2, noise + spans + 1, spans)] = name
  assert len(signatures) == 6  # distinguishable at these lengths
  mixture = seqio.get_mixture_or_task("ul2x_ul2")
  ds = mixture.get_dataset(lengths, split="train", seed=0, shuffle=False)
  batch = next(ds.take(count).padded_batch(count).as_numpy_iterator())
  inputs, targets = batch["inputs"], batch["targets"]
  keys = np.stack([inputs[:, 0], (inputs > 0).sum(axis=1), (targets > 0).sum(axis=1),
                   (targets >= LOWEST_SENTINEL).sum(axis=1)], axis=1)
  counts = collections.Counter(
      "s" if key[0] == vocabularies.paradigm_token_id(VOCAB, "[S2S]") else signatures[tuple(key)]
      for key in keys.tolist())
  return {name: counts[name] / count for name in DENOISERS}


def test_mixture_shares_match_default_rates():
  shares = _measured_shares({"inputs": 128, "targets": 64}, 6000)
  total = sum(ul2.DEFAULT_MIXING_RATES.values())
  for name, share in shares.items():
    assert share == pytest.approx(ul2.DEFAULT_MIXING_RATES[name] / total, abs=0.02), name


def test_mixture_rates_from_gin():
  try:
    gin.parse_config("ul2_mixing_rates.rates = {'s': 0.5, 'x64_15': 0.0}")
    rates = ul2.ul2_mixing_rates()
    shares = _measured_shares({"inputs": 128, "targets": 64}, 3000)
  finally:
    gin.clear_config()
  assert rates["s"] == 0.5 and rates["x64_15"] == 0.0 and rates["r3_15"] == 0.8 / 6
  assert shares["x64_15"] == 0.0
  assert shares["s"] == pytest.approx(0.5 / sum(rates.values()), abs=0.03)
  with pytest.raises(ValueError, match="unknown denoiser 'x9'; the denoisers are r3_15"):
    ul2.ul2_mixing_rates({"x9": 1.0})


def test_denoiser_errors_name_the_denoiser_and_the_fix():
  with pytest.raises(ValueError, match=r"inputs=3, targets=16 are too short for span_corruption"
                                       r".*paradigm_token='\[NLU\]'.*minimum is inputs=4"):
    ul2x.tasks.get_dataset("ul2x_ul2", {"inputs": 3, "targets": 16}, "train", 2)
  with pytest.raises(ValueError, match=r"too short for prefix_lm\(paradigm_token='\[S2S\]'\)"):
    preprocessors.prefix_lm_split({"inputs": 2, "targets": 16}, "[S2S]")
  # X (mu=3, r=0.5) at 1024/1024 needs 246 sentinels.
  with pytest.raises(ValueError, match=r"span_corruption\(noise_density=0.5, mean_noise_span_length"
                                       r"=3.0.* 2\d\d noise spans, but the vocabulary has 122"):
    ul2x.tasks.get_dataset("ul2x_ul2", {"inputs": 1024, "targets": 1024}, "train", 2)
