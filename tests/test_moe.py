"""Mixture of experts: routers against plain-numpy references, the gather dispatch against
its one-hot twin, expert parallelism against one device, causality, upcycling, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ul2x import partitioning
from ul2x.model import TransformerConfig, build_model
from ul2x.model.flops import training_flops_per_example
from ul2x.model.moe import MoeMLP, group_layout, to_groups
from ul2x.trainer.router_metrics import pop_router_metrics
from ul2x.trainer.upcycling import upcycle_dense_params

LAYER = dict(emb_dim=16, mlp_dim=32, num_experts=4, capacity_factor=1.0)
MODEL = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
             num_encoder_layers=1, num_decoder_layers=1, num_experts=4, moe_layer_interval=1)
RULES = partitioning.standard_logical_axis_rules()


def layer(router, **overrides):
  return MoeMLP(TransformerConfig(**{**LAYER, **overrides}), router=router, rngs=nnx.Rngs(0))


def tokens(key, shape, vocab=64):
  return jax.random.randint(jax.random.key(key), shape, 3, vocab, jnp.int32)


@nnx.jit
def apply(model, batch):
  """Logits and router metrics of one call (popping what the MoE layers sowed)."""
  logits = model(batch)
  return logits, pop_router_metrics(model)


def _call_layer(moe, x, segment_ids):
  """An MoE layer's output and the values it sowed."""
  y = moe(x, segment_ids=segment_ids)
  return y, nnx.to_pure_dict(nnx.pop(moe, nnx.Intermediate))["router_stats"][0]


call_layer = nnx.jit(_call_layer)


# ---- plain-numpy references -------------------------------------------------------------


def numpy_groups(batch, length, group_size):
  """Independent group layout: lists of (row, position), position-major within a group."""
  if group_size >= length:
    rows = np.gcd(batch, group_size // length)
    return [[(b0 + r, p) for p in range(length) for r in range(rows)]
            for b0 in range(0, batch, rows)]
  return [[(b, c + p) for p in range(group_size)]
          for b in range(batch) for c in range(0, length, group_size)]


def numpy_expert_choice(probs, real, capacity):
  """probs: [S, E] of one group; real: [S] bool -> {expert: {token: weight}}."""
  chosen = {}
  for e in range(probs.shape[1]):
    candidates = sorted((s for s in range(len(real)) if real[s]), key=lambda s: (-probs[s, e], s))
    chosen[e] = {s: probs[s, e] for s in candidates[:capacity]}
  return chosen


def numpy_token_choice(probs, real, k, capacity):
  """-> ({expert: {token: weight}}, kept [S, k]) filling slots token by token, rank by rank."""
  chosen = {e: {} for e in range(probs.shape[1])}
  kept = np.zeros((len(real), k), bool)
  for s in range(len(real)):
    if not real[s]:
      continue
    order = np.argsort(-probs[s], kind="stable")[:k]
    gates = probs[s, order] / (probs[s, order].sum() if k > 1 else 1.0)
    for j, e in enumerate(order):
      if len(chosen[e]) < capacity:
        chosen[e][s] = gates[j]
        kept[s, j] = True
  return chosen, kept


def numpy_experts(moe, x):
  """x: [D] -> [E, D] every expert's gated MLP output, float64."""
  wi_0, wi_1, wo = (np.asarray(w[...], np.float64)
                    for w in (moe.experts.wi_0, moe.experts.wi_1, moe.experts.wo))
  a = np.einsum("d,edh->eh", x, wi_0)
  gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
  return np.einsum("eh,ehd->ed", gelu * np.einsum("d,edh->eh", x, wi_1), wo)


@pytest.mark.parametrize("router,group_size", [("expert_choice", 8), ("expert_choice", 16),
                                               ("top1", 4), ("top2", 16)])
def test_routers_match_numpy_reference(router, group_size):
  moe = layer(router, group_size=group_size)
  b, l, e = 2, 8, 4
  x = jax.random.normal(jax.random.key(1), (b, l, 16))
  segment_ids = jnp.ones((b, l), jnp.int32).at[1, 6:].set(0)
  layout = group_layout(b, l, group_size)

  @nnx.jit
  def call_and_route(moe, x, segment_ids):
    routing, _ = moe.route(to_groups(x, *layout), to_groups(segment_ids != 0, *layout))
    return _call_layer(moe, x, segment_ids), routing

  (out, sown), routing = call_and_route(moe, x, segment_ids)

  xn, real_all = np.asarray(x, np.float64), np.asarray(segment_ids) != 0
  logits = xn @ np.asarray(moe.router.kernel[...], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  groups = numpy_groups(b, l, group_size)
  s = len(groups[0])
  capacity = int(1.0 * s / e)
  expected_out = np.zeros((b, l, 16))
  dropped, per_token, z, aux = [], np.zeros((b, l), int), [], []
  for g, members in enumerate(groups):
    p = np.stack([probs[i, j] for i, j in members])
    real = np.array([real_all[i, j] for i, j in members])
    if router == "expert_choice":
      chosen = numpy_expert_choice(p, real, capacity)
    else:
      k = 1 if router == "top1" else 2
      chosen, kept = numpy_token_choice(p, real, k, capacity)
      dropped.append((real[:, None] & ~kept).sum())
      top = np.argsort(-p, axis=1, kind="stable")[:, :k]
      f = np.array([(top[real] == ex).sum() for ex in range(e)]) / (real.sum() * k)
      aux.append(e * np.sum(f * p[real].mean(0)))
    z.append(np.mean(np.log(np.exp(np.stack([logits[i, j] for i, j in members])[real])
                            .sum(-1)) ** 2))
    for ex in range(e):
      layer_slots = {int(t): float(w) for t, w, v in zip(
          routing.token[g, ex], routing.weight[g, ex], routing.valid[g, ex]) if v}
      assert layer_slots.keys() == chosen[ex].keys(), (g, ex)
      np.testing.assert_allclose([layer_slots[t] for t in sorted(layer_slots)],
                                 [chosen[ex][t] for t in sorted(chosen[ex])], rtol=1e-5)
      for t, w in chosen[ex].items():
        i, j = members[t]
        expected_out[i, j] += w * numpy_experts(moe, xn[i, j])[ex]
        per_token[i, j] += 1
  np.testing.assert_allclose(out, expected_out, atol=1e-5)
  real_tokens = real_all.sum()
  np.testing.assert_allclose(sown["router_z_loss"], np.mean(z), rtol=1e-5)
  histogram = [np.sum((np.minimum(per_token, 4) == i) & real_all) / real_tokens
               for i in range(5)]
  np.testing.assert_allclose(sown["experts_per_token"], histogram, atol=1e-6)
  np.testing.assert_allclose(sown["unrouted_fraction"], histogram[0], atol=1e-6)
  if router == "expert_choice":  # balanced by construction
    np.testing.assert_allclose(sown["tokens_per_expert"], [capacity] * e)
  else:
    np.testing.assert_allclose(sown["aux_loss"], np.mean(aux), rtol=1e-5)
    np.testing.assert_allclose(sown["dropped_fraction"],
                               sum(dropped) / (real_tokens * k), atol=1e-6)


# ---- fast path against the reference twin -----------------------------------------------


def test_gather_dispatch_equals_one_hot_twin():
  fast, reference = layer("top2", group_size=8), layer("top2", group_size=8,
                                                       moe_dispatch="one_hot")
  x = jax.random.normal(jax.random.key(2), (4, 8, 16))

  def loss(moe, x):
    y = moe(x)
    del moe.router_stats  # sown values are not differentiated
    return jnp.sum(jnp.sin(y)), y

  grad = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))
  (g_fast, gx_fast), y_fast = grad(fast, x)
  (g_ref, gx_ref), y_ref = grad(reference, x)
  np.testing.assert_allclose(y_fast, y_ref, atol=1e-6)
  np.testing.assert_allclose(gx_fast, gx_ref, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               nnx.to_pure_dict(nnx.state(g_fast, nnx.Param)),
               nnx.to_pure_dict(nnx.state(g_ref, nnx.Param)))
  assert float(jnp.abs(g_fast.router.kernel[...]).sum()) > 0  # the router learns


# ---- expert parallelism ------------------------------------------------------------------


def _loss_fn(graphdef):
  def loss(state, batch):
    model = nnx.merge(graphdef, state)
    logits = model(batch)
    router = pop_router_metrics(model)
    objective = (jnp.mean(jax.nn.logsumexp(logits, -1)) + 0.01 * router["moe/aux_loss"]
                 + 0.001 * router["moe/router_z_loss"])
    return objective, (logits, router)

  return jax.value_and_grad(loss, has_aux=True)


def test_expert_parallel_equals_unsharded():
  """data=2 x expert=4 against one device: logits, losses, router metrics and gradients.
  The single-device compile also holds model/flops.py's activated FLOPs to XLA's count."""
  cfg = TransformerConfig(vocab_size=256, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512,
                          num_encoder_layers=1, num_decoder_layers=1, moe_layer_interval=1,
                          num_experts=8, expert_mlp_dim=256, group_size=16)
  model = build_model(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = nnx.to_pure_dict(state)
  dec = tokens(1, (8, 16), 256)
  batch = dict(encoder_input_tokens=tokens(0, (8, 32), 256), decoder_input_tokens=dec,
               decoder_target_tokens=dec)
  value_and_grad = _loss_fn(graphdef)
  compiled = jax.jit(value_and_grad).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = 8 * training_flops_per_example(
      cfg, {"encoder_input_tokens": 32, "decoder_input_tokens": 16})
  # XLA also counts element-wise work (norms, softmax, routing): a few percent.
  assert 0.98 < cost["flops"] / analytic < 1.10, (cost["flops"], analytic)
  (loss, (logits, router)), grads = compiled(state, batch)

  mesh = partitioning.create_mesh(data=2, expert=4)
  specs = partitioning.param_specs(state, partitioning.logical_axes(nnx.state(model)), mesh,
                                   RULES)
  sharded = jax.device_put(state, partitioning.to_named(specs, mesh))
  kernel = sharded["encoder"]["layers"][0]["sublayers"][0]["mlp"]["experts"]["wi_0"]
  assert kernel.sharding.spec[0] == "expert"

  def sharded_fn(state, batch):
    with partitioning.axis_rules(mesh, RULES):
      return value_and_grad(state, batch)

  compiled = jax.jit(sharded_fn).lower(sharded, batch).compile()
  assert "all-to-all" in compiled.as_text()
  (loss_s, (logits_s, router_s)), grads_s = compiled(sharded, batch)
  np.testing.assert_allclose(loss, loss_s, rtol=1e-5)
  np.testing.assert_allclose(logits, logits_s, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), router, router_s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, grads_s)


def test_expert_parallel_with_fewer_groups_than_shards():
  """2 groups on data=2 x expert=4: tokens stay replicated over 'expert', each device
  runs its experts on them and the outputs are gathered."""
  moe = layer("expert_choice", num_experts=8, group_size=8)
  x = jax.random.normal(jax.random.key(3), (2, 8, 16))
  graphdef, state = nnx.split(moe)
  mesh = partitioning.create_mesh(data=2, expert=4)

  def run(state, x, rules=None):
    m = nnx.merge(graphdef, state)
    if rules is None:
      return m(x)
    with partitioning.axis_rules(mesh, rules):
      return m(x)

  np.testing.assert_allclose(jax.jit(run)(state, x),
                             jax.jit(lambda s, x: run(s, x, RULES))(state, x), atol=1e-5)


def test_expert_parallel_plan_follows_fallback_rules():
  """A first 'expert' rule on a size-1 axis falls through to the next, as for parameters:
  the plan shards experts where the expert kernels are, and checks divisibility there."""
  mesh = partitioning.create_mesh(data=2, expert=4)
  rules = [("expert", "tensor")] + RULES
  plan = partitioning.expert_parallel_plan(mesh, rules, groups=8, num_experts=8, hidden=32)
  spec = partitioning.logical_to_spec(("expert", "embed", "mlp"), rules, dict(mesh.shape),
                                      (8, 16, 32))
  assert plan.expert_axes == partitioning.mesh_axes(spec[0]) == ("expert",)
  assert plan.exchange == "all_to_all" and "expert" in plan.batch_axes
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by 4, the size of the "
                                       r"mesh axes \('expert',\)"):
    partitioning.expert_parallel_plan(mesh, rules, groups=8, num_experts=6, hidden=32)


# ---- causality ---------------------------------------------------------------------------


def _later_changed(x, t):
  return x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), x[:, t + 1:].shape))


@pytest.mark.parametrize("group_size,capacity_factor", [(4, 1.0), (16, 0.5)])
def test_token_choice_is_causal_and_expert_choice_is_not(group_size, capacity_factor):
  """Token choice (tight capacity, so tokens are dropped) at position t ignores later
  positions of every row; expert choice does not, which is why decoders refuse it."""
  x = jax.random.normal(jax.random.key(4), (2, 8, 16))
  real = jnp.ones((2, 8), jnp.int32)
  for router in ("top1", "top2"):
    moe = layer(router, group_size=group_size, capacity_factor=capacity_factor)
    y, sown = call_layer(moe, x, real)
    assert float(sown["dropped_fraction"]) > 0
    for t in (0, 3, 5):
      np.testing.assert_allclose(y[:, :t + 1], call_layer(moe, _later_changed(x, t), real)[0][
          :, :t + 1], atol=1e-6)
  moe = layer("expert_choice", group_size=group_size, capacity_factor=capacity_factor)
  leaked = call_layer(moe, _later_changed(x, 1), real)[0]
  assert not np.allclose(call_layer(moe, x, real)[0][:, :2], leaked[:, :2], atol=1e-3)


@pytest.mark.parametrize("architecture,router,group_size", [
    ("encoder_decoder", "top2", 8), ("decoder_only", "top1", 16)])
def test_moe_decoder_ignores_later_tokens(architecture, router, group_size):
  position = "relative" if architecture == "encoder_decoder" else "rope"
  cfg = TransformerConfig(**{**MODEL, "architecture": architecture, "position": position,
                             "decoder_router": router, "group_size": group_size,
                             "capacity_factor": 1.0, "num_decoder_layers": 2})
  model = build_model(cfg, nnx.Rngs(0))
  enc, dec = tokens(2, (4, 16)), tokens(0, (4, 8))
  for t in (0, 3, 6):
    later = dec.at[:, t + 1:].set(tokens(1, (4, 8 - t - 1)))
    (a, router_a), (b, _) = (apply(model, dict(encoder_input_tokens=enc, decoder_input_tokens=d,
                                                decoder_target_tokens=d)) for d in (dec, later))
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)
  assert float(router_a["moe/decoder/dropped_fraction"]) > 0  # capacity binds


# ---- upcycling ---------------------------------------------------------------------------


def test_upcycled_model_computes_the_dense_function():
  """Listed dense layers (string keys, as restored from a checkpoint) -> scanned MoE
  blocks. Top-2 routers without drops (capacity = group) over identical experts
  compute the dense MLP, so the logits equal the dense model's."""
  dense = build_model(TransformerConfig(**{**MODEL, "num_experts": 0}), nnx.Rngs(1))
  moe_cfg = TransformerConfig(**{**MODEL, "scan_layers": True, "group_size": 8,
                                 "encoder_router": "top2", "capacity_factor": 4.0})
  moe = build_model(moe_cfg, nnx.Rngs(2))
  dense_params = _stringify(nnx.to_pure_dict(nnx.state(dense)))
  moe_state = nnx.state(moe)
  nnx.replace_by_pure_dict(moe_state, upcycle_dense_params(
      dense_params, nnx.to_pure_dict(moe_state), moe_cfg))
  nnx.update(moe, moe_state)
  batch = dict(encoder_input_tokens=tokens(0, (2, 16)), decoder_input_tokens=tokens(1, (2, 8)),
               decoder_target_tokens=tokens(1, (2, 8)))
  np.testing.assert_allclose(apply(moe, batch)[0], apply(dense, batch)[0], atol=1e-4)


def test_upcycling_scanned_dense_layers_into_listed_blocks():
  deep = {**MODEL, "num_encoder_layers": 4, "num_decoder_layers": 4, "moe_layer_interval": 2}
  dense = nnx.to_pure_dict(nnx.state(build_model(
      TransformerConfig(**{**deep, "num_experts": 0, "scan_layers": True}), nnx.Rngs(1))))
  moe_cfg = TransformerConfig(**deep)
  template = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(moe_cfg,
                                                                           nnx.Rngs(0)))))
  moe = upcycle_dense_params(dense, template, moe_cfg)
  for stack in ("encoder", "decoder"):
    for i in range(4):  # layer i is sublayer i % 2 of block i // 2; sublayer 1 is MoE
      got, want = moe[stack]["layers"][i // 2]["sublayers"][i % 2], dense[stack]["layers"]
      np.testing.assert_array_equal(got["self_attention"]["query"]["kernel"],
                                    want["self_attention"]["query"]["kernel"][i])
      for name in ("wi_0", "wi_1", "wo"):
        kernel = want["mlp"][name]["kernel"][i]
        if i % 2:
          assert got["mlp"]["experts"][name].shape == (4, *kernel.shape)
          for e in range(4):
            np.testing.assert_array_equal(got["mlp"]["experts"][name][e], kernel)
        else:
          np.testing.assert_array_equal(got["mlp"][name]["kernel"], kernel)
  narrow = TransformerConfig(**{**deep, "expert_mlp_dim": 32})
  with pytest.raises(ValueError, match="set --gin.TransformerConfig.expert_mlp_dim to the "
                                       "dense mlp_dim"):
    upcycle_dense_params(dense, nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: build_model(narrow, nnx.Rngs(0))))), narrow)


def _stringify(tree):
  if not isinstance(tree, dict):
    return tree
  return {str(k): _stringify(v) for k, v in tree.items()}


# ---- configuration errors ----------------------------------------------------------------


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match=r"gives an expert capacity of 0 tokens.*raise "
                                       r"--gin.TransformerConfig.capacity_factor"):
    TransformerConfig(**{**MODEL, "num_experts": 64, "group_size": 16})
  with pytest.raises(ValueError, match="decoder_router='expert_choice' would leak future"):
    TransformerConfig(**{**MODEL, "decoder_router": "expert_choice"})
  with pytest.raises(ValueError, match="num_encoder_layers=3 is not a multiple of "
                                       "moe_layer_interval=2"):
    TransformerConfig(**{**MODEL, "num_encoder_layers": 3, "num_decoder_layers": 2,
                         "moe_layer_interval": 2})
  with pytest.raises(ValueError, match="group_size=6 must divide the sequence length 8"):
    nnx.eval_shape(lambda m, x: m(x), layer("top1", group_size=6, capacity_factor=4.0),
                   jnp.zeros((2, 8, 16)))
  moe = layer("top2", num_experts=6, group_size=8, capacity_factor=3.0)
  mesh = partitioning.create_mesh(data=2, expert=4)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by 4, the size of the "
                                       r"mesh axes \('expert',\)"):
    with partitioning.axis_rules(mesh, RULES):
      nnx.eval_shape(lambda m, x: m(x), moe, jnp.zeros((8, 8, 16)))
