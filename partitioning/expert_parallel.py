"""The expert-parallel plan: which mesh axes hold an MoE layer's token groups, its experts
and each expert's hidden dim inside the layer's shard_map, read from the logical-axis rules."""

import math
from typing import NamedTuple

from ul2x.partitioning.rules import logical_to_spec, mesh_axes


class ExpertParallelPlan(NamedTuple):
  """How expert slots are laid out over the mesh inside shard_map."""
  batch_axes: tuple = ()  # mesh axes sharding the groups
  expert_axes: tuple = ()  # mesh axes sharding the experts
  tensor_axes: tuple = ()  # mesh axes sharding each expert's hidden dim
  exchange: str | None = None  # 'all_to_all', 'psum' (tokens replicated) or None


def _rule_axes(rules, mesh_shape: dict, name: str, size: int | None = None) -> tuple:
  """The mesh axes `logical_to_spec` gives a 1-d array of logical axis `name` (and `size`)."""
  spec = logical_to_spec((name,), rules, mesh_shape, None if size is None else (size,))
  return mesh_axes(spec[0] if len(spec) else None)


def expert_parallel_plan(mesh, rules, *, groups: int, num_experts: int,
                         hidden: int) -> ExpertParallelPlan:
  """Shards experts as the 'expert' rules say (all of them, or an error), groups as
  the 'batch' rules, and each expert's hidden dim as the 'mlp' rules."""
  shape = dict(mesh.shape)
  wanted = _rule_axes(rules, shape, "expert")
  size = math.prod(shape[a] for a in wanted)
  if num_experts % size:
    raise ValueError(
        f"num_experts={num_experts} is not divisible by {size}, the size of the mesh axes "
        f"{wanted} that hold the experts; use a multiple of {size} experts or change "
        "--gin.create_mesh.expert.")
  expert_axes = _rule_axes(rules, shape, "expert", num_experts)
  batch_axes = _rule_axes(rules, shape, "batch", groups)
  if set(expert_axes) <= set(batch_axes):
    exchange = "all_to_all" if expert_axes else None
  else:  # too few groups to spread over the expert axes: each device serves all of them
    batch_axes = tuple(a for a in batch_axes if a not in expert_axes)
    exchange = "psum"
  tensor_axes = tuple(a for a in _rule_axes(rules, shape, "mlp", hidden)
                      if a not in batch_axes + expert_axes)
  return ExpertParallelPlan(batch_axes, expert_axes, tensor_axes, exchange)
