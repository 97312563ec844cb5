"""Mixture-of-experts MLP: expert-choice and top-k token-choice routers, capacity-bounded
or (token choice only) dropless expert-parallel dispatch (laid out by
`partitioning.expert_parallel_plan`; its grouped matmul by name and platform:
`select_grouped_matmul`), and the router losses and metrics each layer sows (the trainer
aggregates them: trainer/router_metrics.py).

Tokens are routed in groups. A group holds `chunk` consecutive positions of
`rows` sequences and lists them position-major (position 0 of every row, then
position 1, ...), so a token's place in the group never depends on a later
position. Token choice fills each expert's slots in that order, which keeps a
causal decoder causal; expert choice compares all tokens of a group and is only
allowed where attention is bidirectional (checked by TransformerConfig). Dropless token
choice has no slots: every choice is computed, and groups only delimit the load-balancing
loss and the metrics.
"""

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ul2x import partitioning
from ul2x.kernels import grouped_matmul_pallas, grouped_matmul_tpu
from ul2x.kernels.grouped_matmul import (combine_sorted, dispatch_sorted, grouped_matmul,
                                         sort_by_expert)
from ul2x.kernels.moe_dispatch import DISPATCH_FNS, from_experts, to_experts
from ul2x.model.layers import ACTIVATIONS, Dense, dropout, split_key, variance_scaling_init

ROUTERS = ("expert_choice", "top1", "top2")
TOP_K = {"top1": 1, "top2": 2}
DISPATCHES = (*DISPATCH_FNS, "dropless")
GROUPED_MATMULS = ("ragged_dot", "pallas")  # TransformerConfig.moe_matmul
HISTOGRAM_BINS = 5  # tokens with 0, 1, 2, 3 and 4 or more experts


class Routing(NamedTuple):
  """Expert slots of each routing group, each [groups, experts, capacity]."""
  token: jax.Array  # int32: index of the slot's token within its group
  weight: jax.Array  # float32: the expert output's weight in the token's output (0 if unused)
  valid: jax.Array  # bool: the slot holds a token


class Choices(NamedTuple):
  """Dropless token choice: each token's k experts, each [groups, group_tokens, k]."""
  expert: jax.Array  # int32: the chosen expert (num_experts for padding: none)
  weight: jax.Array  # float32: that expert's output weight in the token's output (0: padding)


def group_layout(batch: int, length: int, group_size: int) -> tuple[int, int]:
  """-> (rows, chunk): a group holds `chunk` positions of `rows` sequences.

  group_size >= length: whole sequences, group_size // length of them (fewer if
  the batch has fewer rows: the gcd with the batch). group_size < length: it
  must divide the length; each group is one chunk of one sequence.
  """
  if group_size >= length:
    return math.gcd(batch, group_size // length), length
  if length % group_size:
    raise ValueError(
        f"group_size={group_size} must divide the sequence length {length} or be at least "
        f"it; set --gin.TransformerConfig.group_size to a divisor or multiple of {length}.")
  return 1, group_size


def to_groups(x, rows: int, chunk: int):
  """[batch, length, ...] -> [groups, rows * chunk, ...], position-major in each group."""
  b, l, rest = x.shape[0], x.shape[1], x.shape[2:]
  x = x.reshape(b // rows, rows, l // chunk, chunk, *rest)
  x = jnp.moveaxis(x, 1, 3)  # [b/rows, l/chunk, chunk, rows, ...]
  return x.reshape(b // rows * (l // chunk), chunk * rows, *rest)


def from_groups(y, batch: int, length: int, rows: int, chunk: int):
  """Inverse of `to_groups`: [groups, rows * chunk, ...] -> [batch, length, ...]."""
  rest = y.shape[2:]
  y = y.reshape(batch // rows, length // chunk, chunk, rows, *rest)
  return jnp.moveaxis(y, 3, 1).reshape(batch, length, *rest)


def expert_capacity(group_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert and group: capacity_factor x group_tokens / num_experts, rounded
  down and at most group_tokens. capacity_factor is the average number of expert
  slots per token, for every router (top-2 with capacity_factor 2 has no slack)."""
  capacity = min(int(capacity_factor * group_tokens / num_experts + 1e-6), group_tokens)
  if capacity < 1:
    raise ValueError(
        f"capacity_factor={capacity_factor} x {group_tokens} tokens per group / "
        f"num_experts={num_experts} gives an expert capacity of 0 tokens, so nothing could "
        "be routed; raise --gin.TransformerConfig.capacity_factor or group_size, or use "
        "fewer experts.")
  return capacity


def expert_choice_routing(probs, mask, capacity: int) -> Routing:
  """probs: [G, S, E] float32 router probabilities; mask: [G, S] bool (False: padding).

  Each expert takes the `capacity` tokens of the group it gives the highest
  probability (ties: lower index first), weighted by that probability. A token
  may get any number of experts, including none. Padding only lands in slots
  left unused."""
  scores = jnp.where(mask[..., None], probs, -1.0)
  gate, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)
  valid = gate >= 0.0
  return Routing(token.astype(jnp.int32), jnp.where(valid, gate, 0.0), valid)


def top_k_gates(probs, k: int):
  """probs: [..., E] -> (gate, expert) [..., k]: each token's k most probable experts,
  weighted by the probability for k = 1 (Switch) and by the k probabilities renormalised
  to sum 1 for k > 1 (GShard)."""
  gate, expert = jax.lax.top_k(probs, k)
  if k > 1:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  return gate, expert


def dropless_choices(probs, mask, k: int) -> tuple[Choices, jax.Array]:
  """probs: [G, S, E] float32; mask: [G, S] bool -> (choices, expert [G, S, k]): each real
  token's top-k experts (`top_k_gates`), all kept; padding gets no expert."""
  gate, expert = top_k_gates(probs, k)
  real = mask[..., None]
  choices = Choices(jnp.where(real, expert, probs.shape[-1]).astype(jnp.int32),
                    jnp.where(real, gate, 0.0))
  return choices, expert


def token_choice_routing(probs, mask, k: int, capacity: int):
  """probs: [G, S, E] float32; mask: [G, S] bool -> (routing, expert [G, S, k], kept [G, S, k]).

  Each token picks its top-k experts (`top_k_gates`). Slots fill in group order, token
  by token and each token's choices in rank order; an assignment past an expert's
  capacity is dropped. Padding takes no slot.
  """
  g, s, e = probs.shape
  gate, expert = top_k_gates(probs, k)
  flat_expert = expert.reshape(g, s * k)
  real = jnp.repeat(mask, k, axis=1)
  chosen = jax.nn.one_hot(flat_expert, e, dtype=jnp.int32) * real[..., None]
  position = jnp.sum((jnp.cumsum(chosen, axis=1) - chosen) * chosen, axis=-1)
  kept = real & (position < capacity)
  index = (jnp.arange(g)[:, None], flat_expert, jnp.where(kept, position, capacity))
  tokens = jnp.broadcast_to(jnp.repeat(jnp.arange(s, dtype=jnp.int32), k), (g, s * k))
  shape = (g, e, capacity)
  routing = Routing(
      jnp.zeros(shape, jnp.int32).at[index].set(tokens, mode="drop"),
      jnp.zeros(shape, jnp.float32).at[index].set(gate.reshape(g, s * k), mode="drop"),
      jnp.zeros(shape, bool).at[index].set(True, mode="drop"))
  return routing, expert, kept.reshape(g, s, k)


def _group_mean(values, mask):
  """Mean over groups of the mean over each group's real tokens. values, mask: [G, S]."""
  m = mask.astype(jnp.float32)
  return jnp.mean(jnp.sum(values * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))


def router_z_loss(logits, mask):
  """ST-MoE router z-loss: logsumexp(router logits)^2, per group mean over real tokens."""
  return _group_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), mask)


def load_balancing_loss(probs, expert, mask):
  """Switch/GShard auxiliary loss E * sum_e f_e * P_e, averaged over groups: f_e is the
  fraction of the group's k * tokens choices (before capacity) that go to expert e,
  P_e its mean router probability. 1.0 when perfectly balanced."""
  e, k = probs.shape[-1], expert.shape[-1]
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]
  chosen = jnp.sum(jax.nn.one_hot(expert, e) * m[..., None, None], axis=(1, 2)) / (n * k)
  prob = jnp.sum(probs * m[..., None], axis=1) / n
  return jnp.mean(e * jnp.sum(chosen * prob, axis=-1))


def routing_metrics(routing: Routing, logits, mask, kept=None) -> dict:
  """Scalars (and two vectors) describing one layer's routing of the (micro)batch."""
  g, s, _ = logits.shape
  used = routing.valid.astype(jnp.int32)
  per_token = jax.vmap(lambda idx, v: jnp.zeros((s,), jnp.int32).at[idx].add(v))(
      routing.token.reshape(g, -1), used.reshape(g, -1))
  load = jnp.sum(used, axis=(0, 2)).astype(jnp.float32) / g
  return _metrics(per_token, load, logits, mask, kept)


def choice_metrics(choices: Choices, logits, mask) -> dict:
  """`routing_metrics` of dropless token choice: every real token keeps its k choices."""
  g, _, e = logits.shape
  per_token = choices.expert.shape[-1] * mask.astype(jnp.int32)
  load = jnp.sum(jax.nn.one_hot(choices.expert, e), axis=(0, 1, 2)) / g
  kept = jnp.broadcast_to(mask[..., None], choices.expert.shape)
  return _metrics(per_token, load, logits, mask, kept)


def _metrics(per_token, load, logits, mask, kept) -> dict:
  """per_token: [G, S] experts per token; load: [E] tokens per expert and group."""
  m = mask.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(m), 1.0)
  bins = jax.nn.one_hot(jnp.minimum(per_token, HISTOGRAM_BINS - 1), HISTOGRAM_BINS)
  histogram = jnp.sum(bins * m[..., None], axis=(0, 1)) / tokens
  mean_load = jnp.maximum(jnp.mean(load), 1e-9)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  metrics = {
      "tokens_per_expert": load, "expert_load_max": jnp.max(load) / mean_load,
      "expert_load_min": jnp.min(load) / mean_load, "experts_per_token": histogram,
      "unrouted_fraction": histogram[0], "router_entropy": jnp.sum(entropy * m) / tokens,
  }
  if kept is not None:
    metrics["dropped_fraction"] = 1.0 - jnp.sum(kept) / (tokens * kept.shape[-1])
  return metrics


class Experts(nnx.Module):
  """Stacked gated-MLP experts: wi_0, wi_1 [experts, embed, mlp], wo [experts, mlp, embed]."""

  def __init__(self, num_experts: int, emb_dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
    init = variance_scaling_init(1.0, "truncated_normal")

    def stacked(shape):
      keys = jax.random.split(rngs.params(), num_experts)
      return jax.vmap(lambda k: init(k, shape, 1))(keys)

    self.wi_0 = nnx.Param(stacked((emb_dim, mlp_dim)), axes=("expert", "embed", "mlp"))
    self.wi_1 = nnx.Param(stacked((emb_dim, mlp_dim)), axes=("expert", "embed", "mlp"))
    self.wo = nnx.Param(stacked((mlp_dim, emb_dim)), axes=("expert", "mlp", "embed"))


def _expert_slots(xg, routing, wi_0, wi_1, wo, key=None, *,
                  plan: partitioning.ExpertParallelPlan, dispatch_name: str, activation: str,
                  dropout_rate: float):
  """Per shard: dispatch tokens to slots, run the experts, combine. xg: [G, S, D];
  routing: [G, E, C] each; wi_*: [E_local, D, H_local]; wo: [E_local, H_local, D]."""
  dispatch_fn, combine_fn = DISPATCH_FNS[dispatch_name]
  if plan.exchange == "psum":  # this device's experts only; the combine sums over devices
    local = wi_0.shape[0]
    start = jax.lax.axis_index(plan.expert_axes) * local
    routing = Routing(*(jax.lax.dynamic_slice_in_dim(a, start, local, axis=1)
                        for a in routing))
  slots = dispatch_fn(xg, routing.token, routing.valid)
  if plan.exchange == "all_to_all":
    slots = to_experts(slots, plan.expert_axes)
  mesh_axes = plan.batch_axes + plan.expert_axes + plan.tensor_axes
  if key is not None and mesh_axes:
    key = jax.random.fold_in(key, jax.lax.axis_index(mesh_axes))
  act = ACTIVATIONS[activation]
  h = act(jnp.einsum("gecd,edh->gech", slots, wi_0)) * jnp.einsum("gecd,edh->gech", slots, wi_1)
  out = jnp.einsum("gech,ehd->gecd", dropout(h, dropout_rate, key), wo)
  if plan.tensor_axes:
    out = jax.lax.psum(out, plan.tensor_axes)
  if plan.exchange == "all_to_all":
    out = from_experts(out, plan.expert_axes)
  combined = combine_fn(out, routing.token, routing.weight, xg.shape[1])
  return jax.lax.psum(combined, plan.expert_axes) if plan.exchange == "psum" else combined


def select_grouped_matmul(impl: str, platform: str, interpret: bool = False):
  """The grouped matmul `impl` ('ragged_dot' or 'pallas') on `platform`, with the
  signature of kernels/grouped_matmul.py's `grouped_matmul` (ragged_dot, the reference
  twin). 'pallas' on GPU is the Triton kernel of kernels/grouped_matmul_pallas.py
  (forward, dX and dW); on TPU, ragged_dot with dW from the Mosaic kernel of
  kernels/grouped_matmul_tpu.py; with `interpret=True` (tests) the GPU kernels in Pallas
  interpret mode on any other platform. Elsewhere 'pallas' logs once and uses ragged_dot."""
  if impl not in GROUPED_MATMULS:
    raise ValueError(f"grouped matmul {impl!r} is not one of {GROUPED_MATMULS}.")
  if impl == "ragged_dot":
    return grouped_matmul
  if platform == "tpu":
    blocks = (grouped_matmul_tpu.INTERPRET_BLOCKS if interpret
              else grouped_matmul_tpu.DEFAULT_BLOCKS)
    return lambda x, w, sizes: grouped_matmul_tpu.grouped_matmul(x, w, sizes, blocks, interpret)
  if not interpret and platform != "gpu":
    _log_pallas_fallback(platform)
    return grouped_matmul
  blocks = grouped_matmul_pallas.DEFAULT_BLOCKS["gpu" if platform == "gpu" else "cpu"]
  return lambda x, w, sizes: grouped_matmul_pallas.grouped_matmul(x, w, sizes, blocks,
                                                                  interpret)


@functools.cache
def _log_pallas_fallback(platform: str):
  logging.warning("moe_matmul='pallas' has no compiled grouped-matmul kernel on %r: using "
                  "jax.lax.ragged_dot instead.", platform)


def _dropless_experts(xg, choices, wi_0, wi_1, wo, key=None, *,
                      plan: partitioning.ExpertParallelPlan, activation: str,
                      dropout_rate: float, matmul):
  """Per shard: sort the choices of this device's experts by expert, run them as grouped
  matmuls, combine. xg: [G, S, D]; choices: [G, S, k] each; wi_*: [E_local, D, H_local];
  wo: [E_local, H_local, D]. With experts sharded over the batch's expert axes, every
  device of those axes sees all their tokens (all-gather) and each token's output is
  summed back onto its own device (reduce-scatter). `matmul`: the grouped matmul of
  `select_grouped_matmul`."""
  g, s, d = xg.shape
  x, expert, weight = (a.reshape(g * s, *a.shape[2:]) for a in (xg, *choices))
  if plan.exchange == "all_to_all":
    x, expert, weight = (jax.lax.all_gather(a, plan.expert_axes, axis=0, tiled=True)
                         for a in (x, expert, weight))
  local = wi_0.shape[0]
  if plan.expert_axes:
    expert = expert - jax.lax.axis_index(plan.expert_axes) * local
  mesh_axes = plan.batch_axes + plan.expert_axes + plan.tensor_axes
  if key is not None and mesh_axes:
    key = jax.random.fold_in(key, jax.lax.axis_index(mesh_axes))
  order, sizes = sort_by_expert(expert, local)
  rows = dispatch_sorted(x, order, expert.shape[-1])
  act = ACTIVATIONS[activation]
  h = act(matmul(rows, wi_0, sizes)) * matmul(rows, wi_1, sizes)
  out = combine_sorted(matmul(dropout(h, dropout_rate, key), wo, sizes), order, weight)
  if plan.exchange == "all_to_all":
    out = jax.lax.psum_scatter(out, plan.expert_axes, scatter_dimension=0, tiled=True)
  summed = plan.tensor_axes + (plan.expert_axes if plan.exchange == "psum" else ())
  if summed:
    out = jax.lax.psum(out, summed)
  return out.reshape(g, s, d)


class MoeMLP(nnx.Module):
  """Mixture of gated-MLP experts behind a float32 router, in place of `GatedMLP`.

  `router` is 'expert_choice', 'top1' or 'top2'. Routing happens per group of
  `cfg.group_size` tokens (see `group_layout`) with `expert_capacity` slots per
  expert, or (`cfg.moe_dispatch='dropless'`, token choice) without slots: every choice
  runs, through grouped matmuls. Under `partitioning.axis_rules` the experts run in a
  shard_map: expert weights sharded over the 'expert' rule's mesh axes, token slots
  sent to their experts' devices by all-to-all and back (dropless: tokens all-gathered
  over those axes, outputs reduce-scattered). Each call sows router losses and
  metrics (`trainer.router_metrics.pop_router_metrics` collects them).
  """

  def __init__(self, cfg, *, router: str, rngs: nnx.Rngs):
    allowed = tuple(TOP_K) if cfg.moe_dispatch == "dropless" else ROUTERS
    if router not in allowed:
      raise ValueError(
          f"router={router!r} is not one of {allowed} (moe_dispatch={cfg.moe_dispatch!r}).")
    hidden = cfg.expert_mlp_dim or cfg.mlp_dim
    self.router = Dense([cfg.emb_dim], [cfg.num_experts], ("embed", None), dtype=jnp.float32,
                        rngs=rngs, init_scale=0.1)
    self.experts = Experts(cfg.num_experts, cfg.emb_dim, hidden, rngs=rngs)
    self.router_name = router
    self.num_experts = cfg.num_experts
    self.group_size = cfg.group_size
    self.capacity_factor = cfg.capacity_factor
    self.jitter = cfg.router_jitter
    self.dispatch = cfg.moe_dispatch
    self.matmul = cfg.moe_matmul
    self.interpret_kernels = False  # tests: Pallas kernels in interpret mode on any platform
    self.activation = cfg.activation
    self.dropout_rate = cfg.dropout_rate
    self.dtype = cfg.activation_dtype

  def route(self, xg, mask, key=None):
    """xg: [G, S, embed]; mask: [G, S] bool -> (routing, sown values: losses and metrics);
    routing is `Choices` for dropless dispatch, else `Routing` (expert slots)."""
    x32 = xg.astype(jnp.float32)
    if key is not None and self.jitter > 0:
      x32 = x32 * jax.random.uniform(key, x32.shape, jnp.float32, 1 - self.jitter,
                                     1 + self.jitter)
    logits = self.router(x32)
    probs = jax.nn.softmax(logits, axis=-1)
    values = {"router_z_loss": router_z_loss(logits, mask)}
    if self.dispatch == "dropless":
      choices, expert = dropless_choices(probs, mask, TOP_K[self.router_name])
      values["aux_loss"] = load_balancing_loss(probs, expert, mask)
      values.update(choice_metrics(choices, logits, mask))
      return choices, values
    capacity = expert_capacity(xg.shape[1], self.num_experts, self.capacity_factor)
    if self.router_name == "expert_choice":
      routing = expert_choice_routing(probs, mask, capacity)
      kept = None
    else:
      routing, expert, kept = token_choice_routing(probs, mask, TOP_K[self.router_name],
                                                   capacity)
      values["aux_loss"] = load_balancing_loss(probs, expert, mask)
    values.update(routing_metrics(routing, logits, mask, kept))
    return routing, values

  def __call__(self, x, key=None, segment_ids=None):
    """x: [batch, length, embed]; segment_ids: [batch, length] (0 = padding) -> like x."""
    b, l, _ = x.shape
    rows, chunk = group_layout(b, l, self.group_size)
    mask = jnp.ones((b, l), bool) if segment_ids is None else segment_ids != 0
    xg, mask = to_groups(x, rows, chunk), to_groups(mask, rows, chunk)
    k_route, k_experts = split_key(key, 2)
    routing, values = self.route(xg, mask, k_route)
    self.sow(nnx.Intermediate, "router_stats", values)
    return from_groups(self._experts(xg, routing, k_experts), b, l, rows, chunk)

  def _experts(self, xg, routing: Routing | Choices, key):
    weights = [w[...].astype(self.dtype)
               for w in (self.experts.wi_0, self.experts.wi_1, self.experts.wo)]
    context = partitioning.current_axis_rules()
    if self.dispatch == "dropless":
      platform = partitioning.mesh_platform(None if context is None else context[0])
      body = functools.partial(
          _dropless_experts, activation=self.activation, dropout_rate=self.dropout_rate,
          matmul=select_grouped_matmul(self.matmul, platform, self.interpret_kernels))
    else:
      body = functools.partial(_expert_slots, dispatch_name=self.dispatch,
                               activation=self.activation, dropout_rate=self.dropout_rate)
    args = (xg.astype(self.dtype), routing, *weights) + (() if key is None else (key,))
    if context is None:
      return body(*args, plan=partitioning.ExpertParallelPlan())
    mesh, rules = context
    plan = partitioning.expert_parallel_plan(mesh, rules, groups=xg.shape[0],
                                             num_experts=self.num_experts,
                                             hidden=weights[0].shape[-1])
    tokens = P(plan.batch_axes or None)
    wi = P(plan.expert_axes or None, None, plan.tensor_axes or None)
    wo = P(plan.expert_axes or None, plan.tensor_axes or None, None)
    specs = (tokens, jax.tree.map(lambda _: tokens, routing), wi, wi, wo) + (
        () if key is None else (P(),))
    # check_vma off in interpret mode: jax 0.10's Pallas interpreter loses varying axes.
    return jax.shard_map(functools.partial(body, plan=plan), mesh=mesh, in_specs=specs,
                         out_specs=tokens, check_vma=not self.interpret_kernels)(*args)
