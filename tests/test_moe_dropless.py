"""Dropless token-choice MoE (`moe_dispatch='dropless'`): the grouped-matmul layer against a
plain jnp reference where every chosen expert runs on its token, no drops where capacity
dispatch drops, expert parallelism against one device, config errors and FLOP counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ul2x import partitioning
from ul2x.model import TransformerConfig, build_model
from ul2x.model.flops import training_flops_per_example
from ul2x.model.moe import MoeMLP
from ul2x.trainer.router_metrics import pop_router_metrics

LAYER = dict(emb_dim=16, mlp_dim=32, num_experts=8, group_size=8, decoder_router="top2",
             encoder_router="top2", moe_dispatch="dropless")
RULES = partitioning.standard_logical_axis_rules()


def layer(router, **overrides):
  return MoeMLP(TransformerConfig(**{**LAYER, **overrides}), router=router, rngs=nnx.Rngs(0))


def reference(params, x, segment_ids, k):
  """Plain jnp: every expert runs on every token; a token's output is the sum over its
  top-k experts of the renormalised (k > 1) probability x that expert's output.
  params: the layer's pure dict; x: [B, L, D] -> [B, L, D]."""
  logits = x.astype(jnp.float32) @ params["router"]["kernel"]
  probs = jax.nn.softmax(logits, axis=-1)
  gate, expert = jax.lax.top_k(probs, k)
  if k > 1:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  weight = jnp.sum(jax.nn.one_hot(expert, probs.shape[-1]) * gate[..., None], axis=-2)
  weight = weight * (segment_ids != 0)[..., None]
  e = params["experts"]
  h = jax.nn.gelu(jnp.einsum("bld,edh->bleh", x, e["wi_0"])) * jnp.einsum(
      "bld,edh->bleh", x, e["wi_1"])
  return jnp.einsum("bleh,ehd,ble->bld", h, e["wo"], weight)


def skew_to_expert(moe, x, expert):
  """Router weights and inputs that send every token's first choice to `expert` (its
  logit is the sum of the inputs, the others' stay small); later choices vary."""
  moe.router.kernel[...] = moe.router.kernel[...].at[:, expert].set(1.0)
  return jnp.abs(x) + 0.1


def layer_loss(graphdef, segment_ids, rules=None, mesh=None):
  """(state, x) -> (sum(sin(y)), (y, sown router values)) of the layer."""
  def loss(state, x):
    moe = nnx.merge(graphdef, state)
    if rules is None:
      y = moe(x, segment_ids=segment_ids)
    else:
      with partitioning.axis_rules(mesh, rules):
        y = moe(x, segment_ids=segment_ids)
    sown = nnx.to_pure_dict(nnx.pop(moe, nnx.Intermediate))["router_stats"][0]
    return jnp.sum(jnp.sin(y)), (y, sown)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tolerance), a, b)


@pytest.mark.parametrize("router,skewed", [("top1", False), ("top2", True)])
def test_dropless_equals_reference_in_outputs_and_gradients(router, skewed):
  """Skewed: every token's first choice is expert 5, so the capacity dispatch with the
  same router drops choices while dropless computes them all."""
  k = 1 if router == "top1" else 2
  moe = layer(router)
  x = jax.random.normal(jax.random.key(1), (4, 8, 16))
  if skewed:
    x = skew_to_expert(moe, x, 5)
  segment_ids = jnp.ones((4, 8), jnp.int32).at[1, 5:].set(0)
  graphdef, state = nnx.split(moe)
  (_, (y, sown)), (g_state, g_x) = layer_loss(graphdef, segment_ids)(state, x)

  params = nnx.to_pure_dict(state)

  def ref_loss(params, x):
    y = reference(params, x, segment_ids, k)
    return jnp.sum(jnp.sin(y)), y

  (g_ref, gx_ref), y_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1), has_aux=True))(params, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(g_x, gx_ref, atol=1e-5)
  _assert_trees_close(nnx.to_pure_dict(g_state), g_ref, atol=1e-5)
  assert float(jnp.abs(g_ref["router"]["kernel"]).sum()) > 0  # the router learns

  real = segment_ids != 0
  chosen = jax.lax.top_k(x @ params["router"]["kernel"], k)[1]
  load = jnp.sum(jax.nn.one_hot(chosen, 8) * real[..., None, None], axis=(0, 1, 2)) / 4
  np.testing.assert_allclose(sown["tokens_per_expert"], load)  # 4 groups of 8 tokens
  assert float(sown["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(sown["experts_per_token"][k], 1.0)
  if skewed:
    np.testing.assert_allclose(sown["tokens_per_expert"][5], jnp.sum(real) / 4)

  capacity_graphdef = nnx.split(layer(router, moe_dispatch="gather", capacity_factor=1.0))[0]
  (_, (y_capacity, sown_capacity)), _ = layer_loss(capacity_graphdef, segment_ids)(state, x)
  for name in ("aux_loss", "router_z_loss", "router_entropy"):  # as for token choice
    np.testing.assert_allclose(sown[name], sown_capacity[name], rtol=1e-5, err_msg=name)
  assert float(sown_capacity["dropped_fraction"]) > (0.3 if skewed else 0.0)
  assert not np.allclose(y_capacity, y_ref, atol=1e-3)


MESHES = {  # mesh sizes, routing groups, how tokens reach the experts
    "data2_expert4": (dict(data=2, expert=4), 8, "all_to_all"),
    "data2_expert4_few_groups": (dict(data=2, expert=4), 2, "psum"),  # tokens replicated
    "expert4_tensor2": (dict(data=1, expert=4, tensor=2), 8, "all_to_all"),  # hidden split
}


@pytest.mark.parametrize("mesh_name", MESHES)
def test_expert_parallel_dropless_equals_one_device(mesh_name):
  """On 8 devices with experts sharded over 'expert', outputs, sown values and gradients
  equal the one-device result, also when every token's first choice is one expert."""
  sizes, groups, exchange = MESHES[mesh_name]
  mesh = partitioning.create_mesh(**sizes)
  plan = partitioning.expert_parallel_plan(mesh, RULES, groups=groups, num_experts=8,
                                           hidden=32)
  assert plan.exchange == exchange and plan.expert_axes == ("expert",)
  moe = layer("top2")
  x = jax.random.normal(jax.random.key(2), (groups, 8, 16))
  segment_ids = jnp.ones(x.shape[:2], jnp.int32).at[0, 6:].set(0)
  graphdef, state = nnx.split(moe)
  single = layer_loss(graphdef, segment_ids)
  sharded = layer_loss(graphdef, segment_ids, RULES, mesh).lower(state, x).compile()
  # dropless all-gathers tokens over 'expert' and reduce-scatters their outputs
  assert ("reduce-scatter" in sharded.as_text()) == (exchange == "all_to_all")
  for skewed in (False, True):
    if skewed:
      x = skew_to_expert(moe, x, 5)
      state = nnx.state(moe)
    (loss, (y, sown)), grads = single(state, x)
    (loss_s, (y_s, sown_s)), grads_s = sharded(state, x)
    np.testing.assert_allclose(loss, loss_s, rtol=1e-5)
    np.testing.assert_allclose(y, y_s, atol=1e-5)
    _assert_trees_close(sown, sown_s, rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads, grads_s, rtol=1e-4, atol=1e-6)


def test_dropless_model_on_expert_mesh_equals_one_device():
  """A decoder-only model (whose unused encoder_router may stay 'expert_choice'), its
  router losses and gradients, on data=2 x expert=4 against one device."""
  cfg = TransformerConfig(architecture="decoder_only", position="rope", vocab_size=64,
                          emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_decoder_layers=1, num_experts=8, moe_layer_interval=1,
                          group_size=8, decoder_router="top2", moe_dispatch="dropless")
  graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 3, 64, jnp.int32)
  batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=tokens)

  def loss(state, batch):
    model = nnx.merge(graphdef, state)
    logits = model(batch)
    router = pop_router_metrics(model)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + 0.01 * router["moe/aux_loss"], router

  mesh = partitioning.create_mesh(data=2, expert=4)

  def sharded_loss(state, batch):
    with partitioning.axis_rules(mesh, RULES):
      return loss(state, batch)

  (value, router), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, batch)
  (value_s, router_s), grads_s = jax.jit(jax.value_and_grad(sharded_loss, has_aux=True))(
      state, batch)
  assert float(router["moe/decoder/dropped_fraction"]) == 0.0
  np.testing.assert_allclose(value, value_s, rtol=1e-5)
  _assert_trees_close(router, router_s, rtol=1e-5, atol=1e-6)
  _assert_trees_close(grads, grads_s, rtol=1e-4, atol=1e-6)


def test_dropless_flops_count_k_experts_per_token():
  """Dropless top-k: per token the router plus k expert MLPs, whatever capacity_factor:
  the FLOPs of a dense model whose MLP is k expert MLPs wide, plus the routers."""
  sizes = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=2,
               num_decoder_layers=2)
  lengths = {"encoder_input_tokens": 32, "decoder_input_tokens": 16}
  for k, router in ((1, "top1"), (2, "top2")):
    moe = dict(sizes, mlp_dim=64, num_experts=8, moe_layer_interval=1, expert_mlp_dim=48,
               encoder_router=router, decoder_router=router, group_size=16)
    dense = training_flops_per_example(TransformerConfig(**sizes, mlp_dim=48 * k), lengths)
    routers = 3 * (2 * 32 + 2 * 16) * 2 * 32 * 8  # 3 x forward, layers x tokens, 2 D E
    for capacity_factor in (1.0, 4.0):
      cfg = TransformerConfig(**moe, moe_dispatch="dropless", capacity_factor=capacity_factor)
      assert training_flops_per_example(cfg, lengths) == dense + routers
    assert training_flops_per_example(TransformerConfig(
        **moe, capacity_factor=4.0), lengths) != dense + routers


def test_dropless_config_errors():
  with pytest.raises(ValueError, match=r"^TransformerConfig.moe_dispatch='dropless' is for "
                                       r"token-choice routers, but encoder_router="
                                       r"'expert_choice' .*set --gin.TransformerConfig."
                                       r"encoder_router='top2'"):
    TransformerConfig(num_experts=4, moe_layer_interval=1, moe_dispatch="dropless")
  with pytest.raises(ValueError, match=r"router='expert_choice' is not one of \('top1', "
                                       r"'top2'\) \(moe_dispatch='dropless'\)"):
    layer("expert_choice")
  # No capacity: a capacity_factor that would leave no slot is unused.
  TransformerConfig(num_experts=64, group_size=16, moe_layer_interval=1, capacity_factor=1.0,
                    encoder_router="top1", moe_dispatch="dropless")
