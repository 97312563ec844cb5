"""T5 v1.1 / UL2 encoder-decoder and decoder-only (causal or prefix-LM) transformers.

Both take a batch of seqio feature-converter features and return float32
logits [batch, length, vocab]. Packed batches carry segment ids and positions;
unpacked ones get them from the non-padding tokens.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ul2x.model import kv_cache
from ul2x.model.attention import MultiHeadAttention, ring_layout, stack_bias
from ul2x.model.config import REMAT_POLICIES, TransformerConfig
from ul2x.model.contract import STACK_TOKENS, unpacked_segments_positions
from ul2x.model.layers import Dense, Embed, GatedMLP, RMSNorm, dropout, split_key
from ul2x.model.moe import MoeMLP
from ul2x.model.position import RelativePositionBias
from ul2x.partitioning import constrain

_ACT = ("batch", "length", "embed")


class TransformerLayer(nnx.Module):
  """Pre-norm layer: self-attention, optional cross-attention, gated MLP (or, with
  `moe`, a mixture of experts: routed by `decoder_router` if causal, else
  `encoder_router`), each residual."""

  def __init__(self, cfg: TransformerConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs,
               moe: bool = False):
    dt = cfg.activation_dtype
    self.self_attention_norm = RMSNorm(cfg.emb_dim, dtype=dt)
    self.self_attention = MultiHeadAttention(cfg, causal=causal, rngs=rngs)
    if cross:
      self.cross_attention_norm = RMSNorm(cfg.emb_dim, dtype=dt)
      self.cross_attention = MultiHeadAttention(cfg, causal=False, rngs=rngs)
    self.cross = cross
    self.mlp_norm = RMSNorm(cfg.emb_dim, dtype=dt)
    if moe:
      router = cfg.decoder_router if causal else cfg.encoder_router
      self.mlp = MoeMLP(cfg, router=router, rngs=rngs)
    else:
      self.mlp = GatedMLP(cfg.emb_dim, cfg.mlp_dim, cfg.activation, cfg.dropout_rate,
                          dtype=dt, rngs=rngs)
    self.moe = moe
    self.dropout_rate = cfg.dropout_rate
    self.cfg = cfg

  def __call__(self, x, ctx: dict, key=None, cache=None):
    """x: [batch, length, embed]; ctx holds segment ids, positions, bias, encoder output.

    cache: this layer's decoding cache ({'self': keys/values, 'cross': the encoder's});
    then ctx's `kv_*` entries describe the cached positions, the new keys and values are
    written at `positions`, and the queries attend to the whole cache. -> (x, cache).
    """
    k_attn, k_cross, k_mlp, k_out = split_key(key, 4)
    h = self.self_attention_norm(x)
    queries = dict(q_segment_ids=ctx["segment_ids"], q_positions=ctx["positions"],
                   q_prefix=ctx.get("prefix"), bias=ctx.get("bias"))
    if cache is None:
      h = self.self_attention(h, h, kv_segment_ids=ctx["segment_ids"],
                              kv_positions=ctx["positions"], kv_prefix=ctx.get("prefix"),
                              **queries)
    else:
      k, v = self.self_attention.project_kv(h, ctx["positions"])
      offset = ctx["positions"][:, 0]
      cache = dict(cache, self={
          "k": kv_cache.write(cache["self"]["k"], kv_cache.heads_first(k), offset, axis=1),
          "v": kv_cache.write(cache["self"]["v"], kv_cache.heads_first(v), offset, axis=1)})
      h = self.self_attention(h, None, kv_segment_ids=ctx["kv_segment_ids"],
                              kv_positions=ctx["kv_positions"], kv_prefix=ctx["kv_prefix"],
                              kv=(cache["self"]["k"], cache["self"]["v"]), **queries)
    x = constrain(x + dropout(h, self.dropout_rate, k_attn), _ACT)
    if self.cross:
      h = self.cross_attention(
          self.cross_attention_norm(x), ctx.get("encoded"), q_segment_ids=ctx["segment_ids"],
          kv_segment_ids=ctx["encoded_segment_ids"], q_positions=ctx["positions"],
          kv_positions=ctx["encoded_positions"],
          kv=None if cache is None else (cache["cross"]["k"], cache["cross"]["v"]))
      x = constrain(x + dropout(h, self.dropout_rate, k_cross), _ACT)
    h = self.mlp_norm(x)
    h = self.mlp(h, k_mlp, ctx["segment_ids"]) if self.moe else self.mlp(h, k_mlp)
    return constrain(x + dropout(h, self.dropout_rate, k_out), _ACT), cache

  def init_cache(self, batch: int, length: int, encoded=None, encoded_positions=None) -> dict:
    """Empty self-attention keys/values for `length` positions; with cross-attention, the
    keys/values of `encoded` [batch, enc_len, embed]."""
    cache = {"self": kv_cache.empty_kv(batch, length, self.cfg)}
    if self.cross:
      k, v = self.cross_attention.project_kv(encoded, encoded_positions)
      cache["cross"] = {"k": kv_cache.heads_first(k), "v": kv_cache.heads_first(v)}
    return cache


class MoeBlock(nnx.Module):
  """`cfg.moe_layer_interval` layers, the last with a mixture-of-experts MLP: the unit
  a MoE model's LayerStack repeats, so that scanned stacks stay uniform."""

  def __init__(self, cfg: TransformerConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs):
    n = cfg.moe_layer_interval
    self.sublayers = nnx.List([
        TransformerLayer(cfg, causal=causal, cross=cross, moe=i == n - 1, rngs=rngs)
        for i in range(n)])

  def __call__(self, x, ctx: dict, key=None, cache=None):
    caches = [None] * len(self.sublayers) if cache is None else cache
    new = []
    for layer, k, c in zip(self.sublayers, split_key(key, len(self.sublayers)), caches):
      x, c = layer(x, ctx, k, c)
      new.append(c)
    return x, None if cache is None else new

  def init_cache(self, *args) -> list:
    return [layer.init_cache(*args) for layer in self.sublayers]


def _prefix_axes(module: nnx.Module, name: str):
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable) and node.get_metadata().get("axes") is not None:
      node.set_metadata("axes", (name,) + tuple(node.get_metadata()["axes"]))


class LayerStack(nnx.Module):
  """`num_layers` identical layers, as a Python list or stacked and scanned over,
  each rematerialised in the backward pass as `remat` (a `REMAT_POLICIES` name) says."""

  def __init__(self, make_layer, num_layers: int, *, scan: bool, remat: str,
               rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.scan = scan
    self.remat = remat
    if scan:
      create = nnx.vmap(lambda key: make_layer(nnx.Rngs(params=key)), in_axes=0, out_axes=0)
      self.layers = create(jax.random.split(rngs.params(), num_layers))
      _prefix_axes(self.layers, "layers")
    else:
      self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])

  def __call__(self, x, ctx: dict, key=None, cache=None):
    """-> x, or (x, cache) with a decoding `cache` (a list of the layers' caches)."""
    keys = None if key is None else jax.random.split(key, self.num_layers)
    if cache is not None:
      # Decoding runs the layers one by one even when their parameters are stacked: a
      # scan would copy every layer's weights and cache in and out at every step.
      new = []
      for layer, c in zip(self._unstacked(), cache):
        x, c = layer(x, ctx, None, c)
        new.append(c)
      return x, new
    if not self.scan:
      apply = lambda layer, x, k: layer(x, ctx, k)[0]
      if self.remat != "none":
        apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
      for i, layer in enumerate(self.layers):
        x = apply(layer, x, None if keys is None else keys[i])
      return x
    graphdef, state = nnx.split(self.layers)

    def body(x, xs):
      layer_state, k = xs
      layer = nnx.merge(graphdef, layer_state)
      x, _ = layer(x, ctx, k)
      # What layers sow (MoE router stats) leaves the scan stacked over layers.
      return x, nnx.to_pure_dict(nnx.pop(layer, nnx.Intermediate))

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
    x, sown = jax.lax.scan(body, x, (state, keys))
    if sown:
      self.sow(nnx.Intermediate, "scanned", sown)
    return x

  def _unstacked(self) -> list:
    """The layers as separate modules (slices of the stacked parameters when scanned)."""
    if not self.scan:
      return list(self.layers)
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.num_layers)]

  def init_cache(self, *args) -> list:
    """Each layer's `init_cache(*args)`."""
    return [layer.init_cache(*args) for layer in self._unstacked()]


def _layer_stack(cfg: TransformerConfig, num_layers: int, *, causal: bool, cross: bool,
                 rngs: nnx.Rngs) -> LayerStack:
  """`num_layers` layers; with experts, as blocks whose last layer is MoE."""
  if cfg.num_experts:
    make = lambda r: MoeBlock(cfg, causal=causal, cross=cross, rngs=r)
    num_layers //= cfg.moe_layer_interval
  else:
    make = lambda r: TransformerLayer(cfg, causal=causal, cross=cross, rngs=r)
  return LayerStack(make, num_layers, scan=cfg.scan_layers, remat=cfg.remat_policy,
                    rngs=rngs)


def _segments_positions(batch, stack: str):
  """`stack`'s segment ids and positions [batch, len]: a packed batch's, or those of
  one example per row (model/contract.py) where the batch has none."""
  seg, pos = unpacked_segments_positions(batch[STACK_TOKENS[stack]])
  return batch.get(f"{stack}_segment_ids", seg), batch.get(f"{stack}_positions", pos)


class _Output(nnx.Module):
  """Final norm and the float32 logits projection (tied to the embedding or not)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.emb_dim, dtype=cfg.activation_dtype)
    self.tied = cfg.tie_embeddings
    self.emb_dim = cfg.emb_dim
    self.dropout_rate = cfg.dropout_rate
    if not self.tied:
      self.logits = Dense([cfg.emb_dim], [cfg.vocab_size], ("embed", "vocab"),
                          dtype=jnp.float32, rngs=rngs)

  def __call__(self, x, embed: Embed, key=None):
    x = dropout(self.norm(x), self.dropout_rate, key)
    if self.tied:  # T5 rescales tied logits by 1/sqrt(d_model).
      logits = embed.attend(x) / jnp.sqrt(self.emb_dim)
    else:
      logits = self.logits(x)
    return constrain(logits, ("batch", "length", "vocab"))


class EncoderDecoder(nnx.Module):
  """T5 v1.1 / UL2 encoder-decoder with a shared token embedding."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype, rngs=rngs)
    self.encoder_bias = RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                             cfg.num_heads, True, rngs=rngs)
    self.encoder = _layer_stack(cfg, cfg.num_encoder_layers, causal=False, cross=False,
                                rngs=rngs)
    self.encoder_norm = RMSNorm(cfg.emb_dim, dtype=cfg.activation_dtype)
    self.decoder_bias = RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                             cfg.num_heads, False, rngs=rngs)
    self.decoder = _layer_stack(cfg, cfg.num_decoder_layers, causal=True, cross=True,
                                rngs=rngs)
    self.output = _Output(cfg, rngs=rngs)

  def encode(self, batch, key=None):
    """-> (encoded [batch, enc_len, embed], segment ids, positions)."""
    tokens = batch["encoder_input_tokens"]
    seg, pos = _segments_positions(batch, "encoder")
    k_emb, k_layers, k_out = split_key(key, 3)
    x = dropout(self.embed(tokens), self.cfg.dropout_rate, k_emb)
    ctx = dict(segment_ids=seg, positions=pos,
               bias=stack_bias(self.encoder_bias, pos, self.cfg.attention))
    x = self.encoder(constrain(x, _ACT), ctx, k_layers)
    x = dropout(self.encoder_norm(x), self.cfg.dropout_rate, k_out)
    return x, seg, pos

  def __call__(self, batch, *, dropout_key=None):
    """batch: seqio EncDecFeatureConverter features -> logits [batch, dec_len, vocab]."""
    k_enc, k_emb, k_layers, k_out = split_key(dropout_key, 4)
    encoded, enc_seg, enc_pos = self.encode(batch, k_enc)
    seg, pos = _segments_positions(batch, "decoder")
    to_layout, from_layout = ring_layout(self.cfg, seg.shape[1])
    seg, pos, tokens = map(to_layout, (seg, pos, batch["decoder_input_tokens"]))
    x = dropout(self.embed(tokens), self.cfg.dropout_rate, k_emb)
    ctx = dict(segment_ids=seg, positions=pos,
               bias=stack_bias(self.decoder_bias, pos, self.cfg.attention),
               encoded=encoded, encoded_segment_ids=enc_seg, encoded_positions=enc_pos)
    x = self.decoder(constrain(x, _ACT), ctx, k_layers)
    return self.output(constrain(from_layout(x), _ACT), self.embed, k_out)

  def init_decoding(self, batch, max_decode_len: int):
    """Encodes batch['encoder_input_tokens'] [batch, enc_len] once -> (the decoding cache
    for `max_decode_len` decoder positions, first tokens int32 [batch]: the start id 0)."""
    encoded, seg, pos = self.encode(batch)
    b = encoded.shape[0]
    layers = self.decoder.init_cache(b, max_decode_len, encoded, pos)
    cache = kv_cache.empty(b, max_decode_len, layers)
    cache.update(encoded_segment_ids=seg, encoded_positions=pos)
    return cache, jnp.zeros((b,), jnp.int32)

  def decode(self, tokens, cache):
    """tokens: int32 [batch, chunk] at each row's cache['index'] -> (float32 logits
    [batch, chunk, vocab], the cache with their keys/values, advanced by chunk)."""
    return _decode(self, tokens, cache, encoded_segment_ids=cache["encoded_segment_ids"],
                   encoded_positions=cache["encoded_positions"])


class DecoderOnly(nnx.Module):
  """Decoder-only LM: causal, or prefix-LM when the batch has `decoder_causal_attention`
  (bidirectional attention over the prefix, as seqio's PrefixLMFeatureConverter marks it)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype, rngs=rngs)
    if cfg.position == "relative":
      self.decoder_bias = RelativePositionBias(
          cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, False, rngs=rngs)
    self.decoder = _layer_stack(cfg, cfg.num_decoder_layers, causal=True, cross=False,
                                rngs=rngs)
    self.output = _Output(cfg, rngs=rngs)

  def __call__(self, batch, *, dropout_key=None):
    """batch: seqio decoder / prefix-LM features -> logits [batch, length, vocab]."""
    k_emb, k_layers, k_out = split_key(dropout_key, 3)
    seg, pos = _segments_positions(batch, "decoder")
    to_layout, from_layout = ring_layout(self.cfg, seg.shape[1])
    seg, pos, tokens = map(to_layout, (seg, pos, batch["decoder_input_tokens"]))
    x = dropout(self.embed(tokens), self.cfg.dropout_rate, k_emb)
    ctx = dict(segment_ids=seg, positions=pos)
    if "decoder_causal_attention" in batch:
      ctx["prefix"] = to_layout(batch["decoder_causal_attention"])
    if self.cfg.position == "relative":
      ctx["bias"] = stack_bias(self.decoder_bias, pos, self.cfg.attention)
    x = self.decoder(constrain(x, _ACT), ctx, k_layers)
    return self.output(constrain(from_layout(x), _ACT), self.embed, k_out)

  def init_decoding(self, batch, max_decode_len: int):
    """Prefills the prompt -> (the decoding cache for prompt_len + max_decode_len
    positions, first tokens int32 [batch]: each row's last prompt token, which the search
    feeds again at its own position to get the first new token's logits).

    batch: `decoder_input_tokens` [batch, prompt_len] laid out as seqio's converters do
    (0, then the prompt), `decoder_segment_ids` (1 on the prompt, 0 on padding) and,
    for a prefix LM, `decoder_causal_attention` (1 on the bidirectional prefix).
    """
    tokens, seg = batch["decoder_input_tokens"], batch["decoder_segment_ids"]
    b, length = tokens.shape[0], tokens.shape[1] + max_decode_len
    cache = kv_cache.empty(b, length, self.decoder.init_cache(b, length))
    _, cache = _decode(self, tokens, cache, seg, batch.get("decoder_causal_attention"))
    last = jnp.sum((seg != 0).astype(jnp.int32), axis=1) - 1
    cache["index"] = last
    return cache, jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0]

  def decode(self, tokens, cache):
    """tokens: int32 [batch, chunk] at each row's cache['index'] -> (float32 logits
    [batch, chunk, vocab], the cache with their keys/values, advanced by chunk)."""
    return _decode(self, tokens, cache)


def _decode(model, tokens, cache, segment_ids=None, prefix=None, **context):
  """`chunk` new tokens per row through the decoder stack against the cache (shared by
  both architectures; `context` adds the encoder's segment ids and positions)."""
  ctx, cache = kv_cache.chunk_context(cache, tokens.shape[1], segment_ids, prefix)
  if model.cfg.position == "relative":
    ctx["bias"] = model.decoder_bias(ctx["positions"], ctx["kv_positions"])
  x, layers = model.decoder(constrain(model.embed(tokens), _ACT), {**ctx, **context}, None,
                            cache["layers"])
  cache = dict(cache, layers=layers, index=cache["index"] + tokens.shape[1])
  return model.output(constrain(x, _ACT), model.embed), cache


def build_model(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The model class for `cfg.architecture`."""
  cls = EncoderDecoder if cfg.architecture == "encoder_decoder" else DecoderOnly
  return cls(cfg, rngs=rngs)
