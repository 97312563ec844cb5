"""How a state is laid out on the mesh: bytes per device, the parameters left fully
replicated, and the per-leaf table of MODEL_DIR/model-info.txt."""

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ul2x.partitioning.param_names import path_name
from ul2x.partitioning.rules import mesh_axes


def global_bytes(x) -> int:
  """Bytes of a whole array (or `ShapeDtypeStruct`)."""
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def device_bytes(x, sharding) -> int:
  """Bytes of the shard of `x` that each device of `sharding` holds."""
  return math.prod(sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def bytes_per_device(abstract, shardings) -> int:
  """Bytes a device holds of a state tree (`ShapeDtypeStruct` or array leaves) laid out
  by a matching tree of `NamedSharding`s."""
  return sum(jax.tree.leaves(jax.tree.map(device_bytes, abstract, shardings)))


def human_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  units = ("B", "KiB", "MiB", "GiB", "TiB")
  i = 0 if n < 1024 else min(int(math.log(n, 1024)), len(units) - 1)
  return f"{n:.0f} B" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


@dataclasses.dataclass(frozen=True)
class ReplicatedParam:
  path: str
  shape: tuple
  nbytes: int  # on every device: the whole parameter
  reason: str


def _is_axes(x) -> bool:
  return x is None or isinstance(x, tuple)


def replicated_params(abstract_params, param_axes, specs, mesh: Mesh,
                      rules) -> list[ReplicatedParam]:
  """The parameters whose spec shards no dimension, although the mesh has more than one
  device on an axis the rules give parameters (over all parameters' logical names),
  largest first. Empty on a mesh that shards no parameter (e.g. pure data parallel).

  abstract_params, param_axes (logical names or None per parameter) and specs
  (PartitionSpec per parameter) are matching pure-dict trees.
  """
  sizes = dict(mesh.shape)

  def rule_axes(names) -> dict[str, int]:
    """Mesh axes of size > 1 that some rule gives one of `names`, with their sizes."""
    return {a: sizes[a] for name, axes in rules if name in names
            for a in mesh_axes(axes) if sizes.get(a, 1) > 1}

  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  axes = jax.tree.leaves(param_axes, is_leaf=_is_axes)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  param_mesh_axes = rule_axes({n for names in axes if names for n in names})
  if not param_mesh_axes:
    return []
  replicated = []
  for (path, x), names, spec in zip(leaves, axes, spec_leaves, strict=True):
    if any(mesh_axes(entry) for entry in spec):
      continue
    if names is None:
      reason = "it has no logical axis names"
    elif not (wanted := rule_axes(set(names) - {None})):
      reason = f"no rule maps its axes {names} to a mesh axis of size > 1"
    else:
      reason = (f"the rules give its axes {names} the mesh axes {wanted}, but no dimension "
                f"of {tuple(x.shape)} divides by them")
    replicated.append(ReplicatedParam(path_name(path), tuple(x.shape), global_bytes(x), reason))
  return sorted(replicated, key=lambda p: -p.nbytes)


def replicated_summary(replicated: list[ReplicatedParam], num_params: int) -> str:
  """One line: how many parameters stay replicated (`replicated` is not empty, largest
  first), their bytes, and the largest."""
  top = replicated[0]
  total = sum(p.nbytes for p in replicated)
  return (f"replicated parameters: {len(replicated)} of {num_params}, "
          f"{human_bytes(total)} on every device; largest {top.path} {top.shape} "
          f"{human_bytes(top.nbytes)}: {top.reason}")


def byte_limit(value, option: str) -> int | None:
  """`value` (an `option` such as 'train.max_replicated_param_bytes') as a whole number
  of bytes: an integral float from gin (1e6) becomes 1000000; None stays None. Raises
  naming the value for a fraction, a negative, a bool or a non-number."""
  if value is None:
    return None
  limit = int(value) if isinstance(value, float) and value.is_integer() else value
  if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
    raise ValueError(f"{option}={value!r} is not a number of bytes; pass a whole number "
                     f"of bytes, e.g. --gin.{option}=1048576 (or 1e6), or None for no limit.")
  return limit


def check_replicated(replicated: list[ReplicatedParam], limit: int | None, option: str):
  """Raises naming the largest replicated parameter if it is over `limit` bytes
  (None: no limit); `option` is the setting's name for the message."""
  if limit is None or not replicated or replicated[0].nbytes <= limit:
    return
  top = replicated[0]
  raise ValueError(
      f"parameter {top.path} {top.shape} ({top.nbytes} bytes) stays replicated on every "
      f"device ({top.reason}), over {option}={limit}; shard it with a rule "
      "(--gin.standard_logical_axis_rules.additional_rules=...), choose mesh sizes that "
      f"divide it, or raise {option}.")


def model_info(abstract_state, shardings, param_axes, mesh: Mesh) -> str:
  """The text of model-info.txt: one line per parameter and optimizer-state leaf with
  its shape, dtype, logical axes (parameters), PartitionSpec, global and per-device
  bytes, then totals per part of the state."""
  axes = {}
  for path, names in jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=_is_axes):
    axes["params/" + path_name(path)] = names
  mesh_text = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  header = ["name", "shape", "dtype", "logical axes", "spec", "global bytes",
            "bytes per device"]
  rows, totals = [], {}
  for part in sorted(abstract_state, key=lambda k: (k != "params", k)):  # params first
    leaves = jax.tree_util.tree_leaves_with_path({part: abstract_state[part]})
    part_shardings = jax.tree.leaves(shardings[part])
    counts = [0, 0, 0]  # values, global bytes, bytes per device
    for (path, x), sharding in zip(leaves, part_shardings, strict=True):
      name, here = path_name(path), device_bytes(x, sharding)
      counts = [counts[0] + math.prod(x.shape), counts[1] + global_bytes(x), counts[2] + here]
      rows.append([name, str(tuple(x.shape)), str(np.dtype(x.dtype)), str(axes.get(name, "-")),
                   str(sharding.spec), str(global_bytes(x)), str(here)])
    totals[part] = counts
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  text = [f"# mesh: {mesh_text} ({mesh.size} devices)", line(header)]
  text += [line(r) for r in rows]
  text.append("")
  for part, (count, size, held) in totals.items():
    text.append(f"# {part}: {count:,} values, {size:,} bytes in all, {held:,} bytes per device")
  return "\n".join(text) + "\n"
