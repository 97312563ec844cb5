"""Cached decoding equals its reference twin (full recomputation every step) in tokens and
log-probabilities, for every architecture, position encoding, MoE and scanned layers, on a
sharded mesh; and decode scores equal teacher-forced scoring of the decoded sequence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2x import partitioning
from ul2x.model import TransformerConfig
from ul2x.trainer.predict import make_predict_fn, make_score_fn
from ul2x.trainer.setup import setup

ED = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                       num_encoder_layers=2, num_decoder_layers=2)
DO = dataclasses.replace(ED, architecture="decoder_only", position="rope", activation="silu")
# capacity_factor = num_experts: no token is ever dropped, so routing one token per step
# (cached) and the whole sequence (reference) send every token to the same experts.
MOE = dataclasses.replace(ED, num_experts=4, moe_layer_interval=2, group_size=16,
                          capacity_factor=4.0)
CONFIGS = {
    "encoder_decoder": ED,
    "moe_encoder_decoder_scanned": dataclasses.replace(MOE, scan_layers=True),
    "decoder_only_rope_prefix_lm": DO,
    "decoder_only_relative_causal": dataclasses.replace(DO, position="relative"),
    # Dropless routing never drops, so it decodes exactly even at a small capacity factor.
    "moe_dropless": dataclasses.replace(MOE, capacity_factor=0.5, moe_dispatch="dropless",
                                        encoder_router="top2"),
}
MAX_LEN = 10


def _batch(cfg, causal: bool = False):
  rng = np.random.RandomState(0)
  if cfg.architecture == "encoder_decoder":
    tokens = rng.randint(2, cfg.vocab_size, (8, 12)).astype(np.int32)
    tokens[::2, 9:] = 0  # padded rows
    return {"encoder_input_tokens": tokens}
  tokens, seg = np.zeros((8, 7), np.int32), np.zeros((8, 7), np.int32)
  for row in range(8):  # prompts of 1..5 tokens after the leading 0, as seqio lays them out
    n = 1 + row % 5
    tokens[row, 1:n + 1] = rng.randint(2, cfg.vocab_size, n)
    seg[row, :n + 1] = 1
  return {"decoder_input_tokens": tokens, "decoder_segment_ids": seg,
          "decoder_causal_attention": np.zeros_like(seg) if causal else seg}


@pytest.fixture(scope="module")
def mesh():
  return partitioning.create_mesh(data=2, fsdp=2, tensor=2)


def _teacher_forced(cfg, batch, tokens):
  """The decoded tokens as a scoring batch: targets through EOS, inputs shifted right."""
  weights = (np.cumsum(tokens == 1, axis=1) - (tokens == 1) == 0).astype(np.int32)
  if cfg.architecture == "encoder_decoder":
    inputs = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    positions = np.broadcast_to(np.arange(MAX_LEN), (8, MAX_LEN)).astype(np.int32)
    return dict(batch, decoder_input_tokens=inputs, decoder_target_tokens=tokens * weights,
                decoder_loss_weights=weights, decoder_segment_ids=weights,
                decoder_positions=positions)
  prompt = batch["decoder_input_tokens"]
  n = batch["decoder_segment_ids"].sum(1)  # prompt positions, the leading 0 included
  length = prompt.shape[1] + MAX_LEN
  full = np.zeros((8, length), np.int32)
  target_weights = np.zeros((8, length), np.int32)
  for row in range(8):
    full[row, :n[row]] = prompt[row, :n[row]]
    full[row, n[row]:n[row] + MAX_LEN] = tokens[row] * weights[row]
    target_weights[row, n[row] - 1:n[row] - 1 + MAX_LEN] = weights[row]
  targets = np.pad(full[:, 1:], ((0, 0), (0, 1)))
  prefix = np.zeros((8, length), np.int32)
  prefix[:, :prompt.shape[1]] = batch["decoder_causal_attention"]
  return {"decoder_input_tokens": full, "decoder_target_tokens": targets * target_weights,
          "decoder_loss_weights": target_weights, "decoder_causal_attention": prefix,
          "decoder_segment_ids": (np.arange(length) < (n + weights.sum(1))[:, None]).astype(
              np.int32),
          "decoder_positions": np.broadcast_to(np.arange(length), (8, length)).astype(np.int32)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_recomputation(mesh, name):
  cfg = CONFIGS[name]
  job = setup(cfg, mesh=mesh)
  params = job.init_state()["params"]
  batch = _batch(cfg, causal="causal" in name)
  cached, reference = (jax.device_get(make_predict_fn(job, max_decode_len=MAX_LEN,
                                                      cached=c)(params, batch, None))
                       for c in (True, False))
  np.testing.assert_array_equal(cached[0], reference[0])
  np.testing.assert_allclose(cached[1], reference[1], rtol=1e-5, atol=1e-5)
  assert len({tuple(row) for row in cached[0]}) > 1  # rows decode differently
  forced = jax.device_get(make_score_fn(job)(params, _teacher_forced(cfg, batch, cached[0])))
  np.testing.assert_allclose(cached[1], forced, rtol=1e-5, atol=1e-4)


def test_beam_search_through_the_model(mesh):
  """Beam 1 is greedy; beam 4's scores are its sequences' log-likelihoods. (That beam 4
  beats greedy is checked on a trained model in test_jobs.py: on random weights greedy's
  prefix can fall out of the beam.)"""
  job = setup(ED, mesh=mesh)
  params = job.init_state()["params"]
  batch = _batch(ED)
  greedy = jax.device_get(make_predict_fn(job, max_decode_len=MAX_LEN)(params, batch, None))
  beam1 = jax.device_get(make_predict_fn(job, max_decode_len=MAX_LEN, method="beam",
                                         beam_size=1, alpha=0.0)(params, batch, None))
  np.testing.assert_array_equal(greedy[0], beam1[0])
  beam4 = jax.device_get(make_predict_fn(job, max_decode_len=MAX_LEN, method="beam",
                                         beam_size=4, alpha=0.0)(params, batch, None))
  # Reordering the cache by beam is right iff each beam's score is its sequence's
  # teacher-forced log-likelihood (alpha 0: no length normalisation).
  forced = jax.device_get(make_score_fn(job)(params, _teacher_forced(ED, batch, beam4[0])))
  np.testing.assert_allclose(beam4[1], forced, rtol=1e-5, atol=1e-4)
  assert (beam4[0] != greedy[0]).any()


def test_sampling_is_seeded_and_decode_length_is_checked(mesh):
  job = setup(DO, mesh=mesh)
  params = job.init_state()["params"]
  batch = _batch(DO)
  sample = make_predict_fn(job, max_decode_len=MAX_LEN, method="sample", temperature=1.0,
                           top_k=8)
  a, b, c = (jax.device_get(sample(params, batch, jax.random.key(k))[0]) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  with pytest.raises(ValueError, match="max_decode_len=0 must be at least 1"):
    make_predict_fn(job, max_decode_len=0)
  with pytest.raises(ValueError, match="decoding method 'nucleus' is unknown"):
    make_predict_fn(job, max_decode_len=4, method="nucleus")
