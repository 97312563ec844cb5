"""Ring attention (kernels/ring_attention.py) against the reference dense attention:
outputs and gradients per mask kind, layout and ring size; skipped tiles; no dense
bias; length errors; and a whole model on a sequence-sharded mesh."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ul2x import partitioning
from ul2x.kernels import ring_attention as ring
from ul2x.kernels.attention_inputs import PositionBias, Tokens
from ul2x.model import build_model
from ul2x.model.attention import dot_product_attention, ring_dot_product_attention
from ul2x.model.position import T5BucketBias, apply_rope
from train_utils import TINY, loss_and_grads

B, L, H, D = 2, 32, 2, 8
RULES = partitioning.standard_logical_axis_rules()
MESHES = {2: dict(data=2, sequence=2, tensor=2), 4: dict(data=2, sequence=4), 8: dict(sequence=8)}
# causal, bias (None or T5BucketBias.bidirectional), RoPE on q and k.
VARIANTS = {"bidirectional": (False, True, False), "causal": (True, False, False),
            "causal_rope": (True, None, True)}


def _tokens(kind: str) -> Tokens:
  """Segment ids, positions (restarting per segment) and prefix flags, [B, L] each."""
  seg = np.ones((B, L), np.int32)
  if "packed" in kind:  # two segments and trailing padding in each row
    seg[0, 12:26], seg[0, 26:] = 2, 0
    seg[1, 20:] = 2
    seg[1, 29:] = 0
  starts = np.maximum.accumulate(
      np.where(np.diff(seg, axis=1, prepend=-1) != 0, np.arange(L), 0), axis=1)
  pos = np.arange(L) - starts
  prefix = ((pos < 6) & (seg > 0)) if "prefix" in kind else np.zeros((B, L), bool)
  return Tokens(jnp.asarray(seg), jnp.asarray(pos, jnp.int32),
                     jnp.asarray(prefix, jnp.int32))


def _inputs():
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v, ct = (jax.random.normal(key, (B, L, H, D)) for key in keys[:4])
  return q, k, v, ct, jax.random.normal(keys[4], (H, 32)) * 0.5


def _attention(attention_fn, variant, q, k, v, table, tok):
  causal, bidirectional, rope = VARIANTS[variant]
  if rope:
    q, k = apply_rope(q, tok.positions), apply_rope(k, tok.positions)
  bias = None
  if bidirectional is not None:
    bias = PositionBias(table, T5BucketBias(32, 128, bidirectional))
  prefix = tok.prefix if variant == "causal" else None
  return attention_fn(q, k, v, q_segment_ids=tok.segment_ids, kv_segment_ids=tok.segment_ids,
                      q_positions=tok.positions, kv_positions=tok.positions, causal=causal,
                      q_prefix=prefix, kv_prefix=prefix, bias=bias)


def _grad_fn(attend):
  """jit(value_and_grad) of sum(out * ct) w.r.t. q, k, v and the bias table."""
  def loss(q, k, v, table, ct, tok):
    out = attend(q, k, v, table, tok)
    return jnp.sum(out * ct), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@functools.cache
def reference_fn(variant):
  def attend(q, k, v, table, tok):
    dense = lambda bias: None if bias is None else bias(tok.positions, tok.positions)
    fn = lambda q, k, v, bias=None, **kw: dot_product_attention(q, k, v, bias=dense(bias), **kw)
    return _attention(fn, variant, q, k, v, table, tok)
  return _grad_fn(attend)


@functools.cache
def ring_fn(n, variant):
  """The model's ring attention under axis_rules on a mesh with sequence=n."""
  mesh = partitioning.create_mesh(**MESHES[n])

  def attend(q, k, v, table, tok):
    with partitioning.axis_rules(mesh, RULES):
      return _attention(ring_dot_product_attention, variant, q, k, v, table, tok)
  return _grad_fn(attend)


def run_ring(n, variant, zigzag, q, k, v, table, ct, tok):
  """ring_fn's ((loss, out), (dq, dk, dv, dtable)) in the original token order; with
  `zigzag` the inputs are laid out as the model lays out causal stacks, and restored."""
  if not zigzag:
    return ring_fn(n, variant)(q, k, v, table, ct, tok)
  to = functools.partial(ring.zigzag, num_shards=n)
  back = functools.partial(ring.unzigzag, num_shards=n)
  (loss, out), (dq, dk, dv, dtable) = ring_fn(n, variant)(
      *map(to, (q, k, v)), table, to(ct), jax.tree.map(to, tok))
  return (loss, back(out)), (*map(back, (dq, dk, dv)), dtable)


CASES = ([("bidirectional", kind, zz) for kind in ("plain", "packed") for zz in (False, True)]
         + [("causal", kind, zz) for kind in ("plain", "packed", "prefix", "packed_prefix")
            for zz in (False, True)]
         + [("causal_rope", kind, True) for kind in ("plain", "packed")])


# Every case on sequence=4 (with data=2); on 2 (with tensor=2) and 8 devices, the two
# richest: the causal bias with packing and prefixes, and the bidirectional T5 bias.
RING_CASES = ([(4, *case) for case in CASES]
              + [(n, *case) for n in (2, 8) for case in (("causal", "packed_prefix", True),
                                                         ("bidirectional", "packed", False))])


@pytest.mark.parametrize("n,variant,kind,zigzag", RING_CASES, ids=[
    f"{n}-{v}-{k}-{'zigzag' if z else 'contiguous'}" for n, v, k, z in RING_CASES])
def test_matches_reference(n, variant, kind, zigzag):
  q, k, v, ct, table = _inputs()
  tok = _tokens(kind)
  real = np.asarray(tok.segment_ids > 0)[..., None, None]
  ct = ct * real  # padding rows' outputs are unspecified (reference: mean of V; ring: 0)
  (_, want), want_grads = reference_fn(variant)(q, k, v, table, ct, tok)
  (_, got), got_grads = run_ring(n, variant, zigzag, q, k, v, table, ct, tok)
  np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=2e-5)
  for name, g, w in zip(("dq", "dk", "dv", "dtable"), got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=1e-4,
                               err_msg=name)
  if VARIANTS[variant][1] is not None:
    assert np.abs(np.asarray(want_grads[3])).max() > 1e-2  # the bias gradient is exercised


@pytest.mark.parametrize("zigzag", [False, True])
def test_masked_tiles_are_skipped(zigzag):
  """NaN in the last value row reaches only the query tile holding that token: every
  other tile that would read it lies above the causal diagonal and is never computed
  (a computed tile would spread the NaN, as 0 * NaN = NaN, like the dense reference)."""
  q, k, v, ct, table = _inputs()
  v = v.at[:, -1].set(jnp.nan)
  (_, out), _ = run_ring(4, "causal", zigzag, q, k, v, table, ct, _tokens("plain"))
  rows_with_nan = np.isnan(np.asarray(out)).any(axis=(0, 2, 3))
  tile = L // 4 // 2  # the wrapper's tile for a causal block of L/4 tokens
  np.testing.assert_array_equal(np.flatnonzero(rows_with_nan), np.arange(L - tile, L))
  (_, dense), _ = reference_fn("causal")(q, k, v, table, ct, _tokens("plain"))
  assert np.isnan(np.asarray(dense)).all()


def _shard_avals(jaxpr, inside=False):
  """Abstract values of the intermediates inside shard_map bodies (per-device arrays),
  searching nested jaxprs."""
  for eqn in jaxpr.eqns:
    if inside:
      yield from (var.aval for var in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _shard_avals(sub, inside or eqn.primitive.name == "shard_map")


def test_no_per_device_array_spans_two_sequence_blocks():
  """Per device, forward + backward hold no [.., block, block]-sized array (logits, mask
  or bias of one device's block against another's), only tiles of half a block."""
  length, n = 64, 4
  q, k, v, ct, table = (jnp.concatenate([x, x], axis=1) if x.ndim == 4 else x
                        for x in _inputs())
  tok = Tokens(*(jnp.tile(x, (1, 2)) for x in _tokens("packed_prefix")))
  mesh = partitioning.create_mesh(**MESHES[n])

  def loss(q, k, v, table):
    with partitioning.axis_rules(mesh, RULES):
      return jnp.sum(_attention(ring_dot_product_attention, "causal", q, k, v, table, tok) * ct)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, table).jaxpr
  block = length // n
  shapes = [a.shape for a in _shard_avals(jaxpr) if hasattr(a, "shape")]
  assert (B // MESHES[n]["data"], block, H, D) in shapes  # the walk sees the local blocks
  big = [s for s in shapes if sum(d >= block for d in s) >= 2]
  assert not big, f"per-device arrays spanning two blocks of {block} tokens: {big}"


def test_ring_holds_one_key_value_block_in_transit():
  """XLA's memory analysis of the compiled (never run) causal forward + backward with a
  relative bias on sequence=8: besides its inputs and gradients, a device holds the
  output, one travelling copy of K and V and tiles, under 4 blocks of [block, heads,
  head_dim]. Double-buffered blocks, or a copy of the block per tile step, exceed it."""
  n, block, heads, dim = 8, 32768, 1, 128  # 16 MiB per float32 block; tiles of 512
  mesh = partitioning.create_mesh(sequence=n)
  bias = T5BucketBias(32, 128, False)

  def loss(q, k, v, table, ct, seg, pos):
    with partitioning.axis_rules(mesh, RULES):
      out = ring_dot_product_attention(
          q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
          kv_positions=pos, causal=True, bias=PositionBias(table, bias))
    return jnp.sum(out * ct)

  x = jax.ShapeDtypeStruct((1, n * block, heads, dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1, n * block), jnp.int32)
  table = jax.ShapeDtypeStruct((heads, 32), jnp.float32)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  stats = grads.lower(x, x, x, table, x, t, t).compile().memory_analysis()
  block_bytes = block * heads * dim * 4
  assert stats.argument_size_in_bytes < 4.1 * block_bytes  # the walk sees local blocks
  assert stats.temp_size_in_bytes < 4 * block_bytes, stats.temp_size_in_bytes / block_bytes


def test_zigzag_layout_balances_and_round_trips():
  n = 4
  x = jnp.arange(2 * 8 * n).reshape(2, 8 * n)
  z = ring.zigzag(x, n)
  np.testing.assert_array_equal(ring.unzigzag(z, n), x)
  chunks = np.asarray(x[0]).reshape(2 * n, 4)
  for i, block in enumerate(np.asarray(z[0]).reshape(n, 8)):  # shard i: chunks i, 2n-1-i
    np.testing.assert_array_equal(block, np.concatenate([chunks[i], chunks[2 * n - 1 - i]]))
  with pytest.raises(ValueError, match="2 x 4 shards = 8 chunks, but the length is 36"):
    ring.zigzag(jnp.zeros((1, 36)), 4)


def test_dense_bias_is_rejected():
  q = jnp.zeros((1, 8, H, D))
  tok = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(TypeError, match="takes bias as a PositionBias"):
    ring.ring_attention(q, q, q, q_segment_ids=tok, kv_segment_ids=tok, q_positions=tok,
                        kv_positions=tok, bias=jnp.zeros((1, H, 8, 8)))


def _lm_batch(length: int, prefix: bool = False, encoder_length: int = 48) -> dict:
  t = jax.random.randint(jax.random.key(1), (4, length), 3, 64, jnp.int32)
  t = t.at[1, length - 6:].set(0)
  weights = (t > 0).astype(jnp.int32)
  enc = jax.random.randint(jax.random.key(2), (4, encoder_length), 3, 64, jnp.int32)
  batch = dict(encoder_input_tokens=enc.at[0, encoder_length - 9:].set(0),
               decoder_target_tokens=t,
               decoder_input_tokens=jnp.pad(t[:, :-1], ((0, 0), (1, 0))),
               decoder_loss_weights=weights)
  if prefix:
    batch["decoder_causal_attention"] = (jnp.arange(length) < 11).astype(jnp.int32) * weights
  return batch


@pytest.mark.parametrize("length,load_balance,message", [
    (36, True, "length 36 to be a multiple of 2 x 4 \\(the ring size\\) = 8"),
    (34, False, "splits the query length 34 over the 4 devices of mesh axis 'sequence'")])
def test_length_must_divide_the_ring(length, load_balance, message):
  cfg = dataclasses.replace(TINY, architecture="decoder_only", attention="ring",
                            ring_load_balance=load_balance)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))
  mesh = partitioning.create_mesh(data=2, sequence=4)
  with partitioning.axis_rules(mesh, RULES), pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda state: nnx.merge(graphdef, state)(_lm_batch(length)), state)


def _assert_model_matches(cfg, mesh_sizes, batch):
  loss, grads = loss_and_grads({"data": 1}, cfg, batch)
  ring_loss, ring_grads = loss_and_grads(mesh_sizes, dataclasses.replace(cfg, attention="ring"),
                                         batch)
  np.testing.assert_allclose(float(ring_loss), float(loss), rtol=1e-5)
  grads, ring_grads = jax.device_get((grads, ring_grads))
  jax.tree.map(lambda g, r: np.testing.assert_allclose(r, g, rtol=1e-4, atol=2e-6),
               grads, ring_grads)


def test_encoder_decoder_with_ring_equals_reference():
  """Encoder (bidirectional + relative bias, 48 tokens), causal decoder in zigzag
  layout (32 tokens) and cross-attention over the encoder's ring, lengths over
  sequence=4, batch and parameters over fsdp=2."""
  cfg = dataclasses.replace(TINY, num_encoder_layers=1, num_decoder_layers=1)
  _assert_model_matches(cfg, dict(sequence=4, fsdp=2), _lm_batch(32))


def test_prefix_lm_with_ring_equals_reference():
  """Decoder-only prefix-LM with relative bias; heads (and the bias table) over tensor=2."""
  cfg = dataclasses.replace(TINY, architecture="decoder_only", num_decoder_layers=1)
  _assert_model_matches(cfg, dict(sequence=4, tensor=2), _lm_batch(32, prefix=True))
