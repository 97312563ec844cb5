"""Model shapes, masking (padding, packing, causality, prefix-LM) and layer-stack variants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ul2x.model import TransformerConfig, build_model, layers
from ul2x.kernels.attention_inputs import Tokens, visible
from ul2x.model.attention import dot_product_attention
from ul2x.model.contract import unpacked_segments_positions
from ul2x.model.position import relative_position_bucket

SMALL = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
             num_encoder_layers=2, num_decoder_layers=2)


def make(**overrides):
  cfg = TransformerConfig(**{**SMALL, **overrides})
  return build_model(cfg, nnx.Rngs(0))


@nnx.jit
def run(model, batch):
  return model(batch)


def tokens(key, shape, vocab=64):
  return jax.random.randint(jax.random.key(key), shape, 3, vocab, jnp.int32)


@pytest.fixture(scope="module")
def encdec():
  return make()


@pytest.fixture(scope="module")
def causal_lm():
  return make(architecture="decoder_only", position="rope", activation="silu")


def encdec_batch(enc, dec):
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=dec)


def test_shapes_and_dtypes(encdec, causal_lm):
  """float32 logits [batch, decoder length, vocab], whose row i is example i's: the
  logits of that example run alone."""
  for model, batch in ((encdec, encdec_batch(tokens(0, (2, 12)), tokens(1, (2, 8)))),
                       (causal_lm, dict(decoder_input_tokens=tokens(2, (2, 8)),
                                        decoder_target_tokens=tokens(3, (2, 8))))):
    out = run(model, batch)
    assert out.shape == (2, 8, 64) and out.dtype == jnp.float32
    for i in range(2):
      alone = run(model, {k: v[i:i + 1] for k, v in batch.items()})
      np.testing.assert_allclose(out[i:i + 1], alone, atol=1e-5)


def test_bfloat16_activations_keep_float32_logits(encdec):
  """Same params (float32 either way), bfloat16 activations: float32 logits that equal the
  float32 model's within a few bfloat16 rounding steps (2^-8 relative) of the largest."""
  model = make(dtype="bfloat16")
  batch = encdec_batch(tokens(0, (2, 12)), tokens(1, (2, 8)))
  out = run(model, batch)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  want = np.asarray(run(encdec, batch))
  np.testing.assert_allclose(out, want, rtol=0, atol=8 * 2.0 ** -8 * np.abs(want).max())


def test_padding_does_not_change_outputs(encdec):
  """Padding appended to the encoder and decoder rows, as 0 tokens or as any tokens with
  segment id 0 (as packing leaves it), leaves the real positions' logits unchanged."""
  enc, dec = tokens(0, (2, 8)), tokens(1, (2, 6))
  want = run(encdec, encdec_batch(enc, dec))
  zeros = run(encdec, encdec_batch(jnp.pad(enc, ((0, 0), (0, 4))), jnp.pad(dec, ((0, 0), (0, 3)))))
  np.testing.assert_allclose(zeros[:, :6], want, atol=1e-5)

  def marked(x, key, n):
    """x with n tokens appended, and its segment ids and positions marking them padding."""
    real = jnp.ones_like(x)
    return (jnp.concatenate([x, tokens(key, (2, n))], axis=1), jnp.pad(real, ((0, 0), (0, n))),
            jnp.pad(jnp.cumsum(real, axis=1) - 1, ((0, 0), (0, n))))

  (enc_p, enc_seg, enc_pos), (dec_p, dec_seg, dec_pos) = marked(enc, 2, 4), marked(dec, 3, 3)
  packed = run(encdec, dict(encdec_batch(enc_p, dec_p), encoder_segment_ids=enc_seg,
                            encoder_positions=enc_pos, decoder_segment_ids=dec_seg,
                            decoder_positions=dec_pos))
  np.testing.assert_allclose(packed[:, :6], want, atol=1e-5)


def test_packed_segments_do_not_attend_across(encdec):
  """Row = [segment 1 | segment 2]; changing segment 2 leaves segment 1's logits alone."""
  enc, dec = tokens(0, (2, 12)), tokens(1, (2, 8))
  seg_e = jnp.array([[1] * 6 + [2] * 6] * 2); pos_e = jnp.array([list(range(6)) * 2] * 2)
  seg_d = jnp.array([[1] * 4 + [2] * 4] * 2); pos_d = jnp.array([list(range(4)) * 2] * 2)

  def packed(enc, dec):
    return run(encdec, dict(encdec_batch(enc, dec), encoder_segment_ids=seg_e,
                            decoder_segment_ids=seg_d, encoder_positions=pos_e,
                            decoder_positions=pos_d))

  base = packed(enc, dec)
  changed = packed(enc.at[:, 6:].set(tokens(5, (2, 6))), dec.at[:, 4:].set(tokens(6, (2, 4))))
  np.testing.assert_allclose(base[:, :4], changed[:, :4], atol=1e-5)
  assert not np.allclose(base[:, 4:], changed[:, 4:], atol=1e-3)
  # Segment 1 alone, padded instead of packed, gives the same logits as inside the row.
  alone = run(encdec, encdec_batch(enc.at[:, 6:].set(0), dec.at[:, 4:].set(0)))
  np.testing.assert_allclose(base[:, :4], alone[:, :4], atol=1e-5)


@pytest.mark.parametrize("t", [0, 3, 6])
def test_causal_decoder_ignores_later_tokens(causal_lm, encdec, t):
  dec = tokens(0, (2, 8))
  later = dec.at[:, t + 1:].set(tokens(1, (2, 8 - t - 1)))
  lm = lambda d: run(causal_lm, dict(decoder_input_tokens=d, decoder_target_tokens=d))
  np.testing.assert_allclose(lm(dec)[:, :t + 1], lm(later)[:, :t + 1], atol=1e-5)
  enc = tokens(2, (2, 12))
  ed = lambda d: run(encdec, encdec_batch(enc, d))
  np.testing.assert_allclose(ed(dec)[:, :t + 1], ed(later)[:, :t + 1], atol=1e-5)


def test_prefix_lm_is_bidirectional_over_prefix_only(causal_lm):
  dec = tokens(0, (2, 8))
  prefix = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
  lm = lambda d: run(causal_lm, dict(decoder_input_tokens=d, decoder_target_tokens=d,
                                     decoder_causal_attention=prefix))
  base = lm(dec)
  # A change inside the prefix reaches earlier prefix positions...
  changed_prefix = lm(dec.at[:, 3].set((dec[0, 3] + 1) % 60 + 3))
  assert not np.allclose(base[:, 0], changed_prefix[:, 0], atol=1e-4)
  # ...but a change in the targets reaches no earlier position.
  changed_target = lm(dec.at[:, 6].set((dec[0, 6] + 1) % 60 + 3))
  np.testing.assert_allclose(base[:, :6], changed_target[:, :6], atol=1e-5)


def _stack_layers(list_params, n):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[list_params[i] for i in range(n)])


@pytest.mark.parametrize("architecture,remat", [("encoder_decoder", True),
                                               ("decoder_only", True),
                                               ("decoder_only", "dots_saveable")])
def test_scan_and_remat_match_the_layer_list(architecture, remat):
  listed = make(architecture=architecture)
  scanned = make(architecture=architecture, scan_layers=True, remat=remat)
  params = nnx.to_pure_dict(nnx.state(listed))
  scan_params = dict(params)
  for stack in ("encoder", "decoder"):
    if stack in params:
      scan_params[stack] = {"layers": _stack_layers(params[stack]["layers"], 2)}
  state = nnx.state(scanned)
  nnx.replace_by_pure_dict(state, scan_params)
  nnx.update(scanned, state)
  batch = encdec_batch(tokens(0, (2, 12)), tokens(1, (2, 8)))

  @nnx.jit
  def loss_and_grad(model):
    return nnx.value_and_grad(lambda m: jnp.mean(m(batch) ** 2))(model)

  (l_list, g_list), (l_scan, g_scan) = loss_and_grad(listed), loss_and_grad(scanned)
  np.testing.assert_allclose(l_list, l_scan, rtol=1e-5)
  np.testing.assert_allclose(g_list["embed"]["embedding"][...],
                             g_scan["embed"]["embedding"][...], rtol=1e-4, atol=1e-6)


def test_attention_mask_semantics():
  seg = jnp.array([[1, 1, 2, 0]])
  pos = jnp.array([[0, 1, 0, 0]])
  mask = visible(Tokens(seg, pos), Tokens(seg, pos), causal=True)[0]
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_unpacked_segments_positions_are_those_of_packing():
  tokens = np.array([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]], np.int32)
  for xp in (np, jnp):
    seg, pos = unpacked_segments_positions(xp.asarray(tokens), xp)
    np.testing.assert_array_equal(seg, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0]])
    assert seg.dtype == pos.dtype == np.int32


def test_reference_attention_matches_softmax_formula():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 3, 2, 4)) for i in range(3))
  seg = jnp.ones((1, 3), jnp.int32)
  pos = jnp.arange(3)[None]
  out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                              q_positions=pos, kv_positions=pos, scale=0.5)
  logits = np.einsum("qhd,khd->hqk", q[0], k[0]) * 0.5
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(out[0], np.einsum("hqk,khd->qhd", weights, v[0]), rtol=1e-5)


def t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int,
              max_distance: int) -> int:
  """T5's `_relative_position_bucket` (mesh_tensorflow / t5.models) for one int, in
  plain Python: the reference the jnp version is held to."""
  bucket, n = 0, -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


# relative position (key - query) -> bucket for 32 buckets, max_distance 128, worked by hand:
# bidirectional: 16 per direction (keys after the query from 16), exact below 8, then
# 8 + floor(ln(n / 8) / ln(16) * 8), at most 15; e.g. n=50: ln 6.25 / ln 16 * 8 = 5.29 -> 13.
GOLDEN_BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, 1: 17, 7: 23, -8: 8, 8: 24, -20: 10, 20: 26,
                        -50: 13, 50: 29, -100: 15, -127: 15, -200: 15, 200: 31, 1000: 31}
# unidirectional: keys after the query all 0, exact below 16, then
# 16 + floor(ln(n / 16) / ln(8) * 16), at most 31; e.g. n=50: ln 3.125 / ln 8 * 16 = 8.77 -> 24.
GOLDEN_UNIDIRECTIONAL = {0: 0, 5: 0, 200: 0, -1: 1, -15: 15, -16: 16, -20: 17, -50: 24,
                         -100: 30, -127: 31, -200: 31, -1000: 31}


def test_relative_position_buckets():
  rel = jnp.arange(-200, 201)
  bi = relative_position_bucket(rel, True, 32, 128)
  uni = relative_position_bucket(rel, False, 32, 128)
  assert int(bi.min()) == 0 and int(bi.max()) == 31
  assert int(uni[rel > 0].max()) == 0  # future keys share bucket 0 one-directionally
  assert bool(jnp.all(jnp.diff(uni[rel <= 0]) <= 0))  # farther past -> larger bucket
  assert int(bi[200]) == 0 and int(bi[201]) != int(bi[199])  # sign is distinguished
  for golden, bidirectional in ((GOLDEN_BIDIRECTIONAL, True), (GOLDEN_UNIDIRECTIONAL, False)):
    got = relative_position_bucket(jnp.array(list(golden)), bidirectional, 32, 128)
    assert dict(zip(golden, got.tolist())) == golden, bidirectional
  wide = np.arange(-1000, 1001)  # past max_distance on both sides
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (16, 64), (64, 256)):
      want = [t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in wide]
      got = relative_position_bucket(jnp.asarray(wide), bidirectional, num_buckets,
                                     max_distance)
      np.testing.assert_array_equal(got, want, err_msg=f"{bidirectional} {num_buckets}")


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="activation='relu'"):
    TransformerConfig(activation="relu")
  with pytest.raises(ValueError, match="rope"):
    TransformerConfig(position="rope")


@pytest.mark.parametrize("n_in,in_shape,out_shape", [(1, (6,), (10,)), (1, (10,), (6,)),
                                                      (2, (2, 3), (5,))])
def test_dense_contract_gradients_equal_autodiff(n_in, in_shape, out_shape):
  """Dense's CPU matmul (layers.contract, a custom VJP that transposes the narrower
  operand itself) has the outputs and gradients of plain tensordot autodiff."""
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 4, *in_shape))
  kernel = jax.random.normal(kk, (*in_shape, *out_shape))
  g = jax.random.normal(kg, (3, 4, *out_shape))
  outs = {}
  for name, fn in (("fast", layers.contract), ("plain", layers._contract)):
    y, vjp = jax.vjp(lambda a, b, fn=fn: fn(a, b, n_in), x, kernel)
    outs[name] = (y, *vjp(g))
  for fast, plain in zip(outs["fast"], outs["plain"]):
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 5, 8])
def test_shared_bias_add_gradients_equal_autodiff(batch):
  """The relative bias's CPU add (layers.add_shared, a custom VJP summing the batch by
  halving, odd sizes included) has the outputs and gradients of plain autodiff."""
  kx, ky, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, 2, 3, 4))
  y = jax.random.normal(ky, (1, 2, 3, 4))
  g = jax.random.normal(kg, (batch, 2, 3, 4))
  outs = {}
  for name, fn in (("fast", layers._add_shared_cpu), ("plain", jnp.add)):
    out, vjp = jax.vjp(fn, x, y)
    outs[name] = (out, *vjp(g))
  for fast, plain in zip(outs["fast"], outs["plain"]):
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_sizes,fast", [(None, True), (dict(data=1, tensor=2), True),
                                              (dict(data=2), False)])
def test_shared_bias_add_takes_the_cpu_path_only_with_the_batch_on_one_device(
    mesh_sizes, fast):
  """Halving a batch split over devices would move its halves between them."""
  from ul2x import partitioning
  x, y = jnp.zeros((4, 2, 3, 3)), jnp.zeros((1, 2, 3, 3))
  grad = jax.grad(lambda y: layers.add_shared(x, y).sum())
  if mesh_sizes is None:
    jaxpr = str(jax.make_jaxpr(grad)(y))
  else:
    mesh = partitioning.create_mesh(**mesh_sizes, devices=jax.devices()[:2])
    with partitioning.axis_rules(mesh, partitioning.standard_logical_axis_rules()):
      jaxpr = str(jax.make_jaxpr(grad)(y))
  assert ("slice[" in jaxpr) == fast  # the halving sum slices; autodiff reduces


def test_unknown_remat_policy_is_one_clear_error():
  with pytest.raises(ValueError, match="remat='dots'.*dots_saveable"):
    TransformerConfig(remat="dots")
