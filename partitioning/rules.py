"""Logical-axis rules (T5X vocabulary) and their mapping to mesh PartitionSpecs."""

import gin
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


# (logical name, mesh axis or axes): see `standard_logical_axis_rules`.
_STANDARD_RULES = [
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("expert", "expert"),
    ("kv", None),
    ("relpos_buckets", None),
    ("layers", None),
]


@gin.configurable
def standard_logical_axis_rules(
    additional_rules=()) -> list[tuple[str, str | tuple[str, ...] | None]]:
  """Default rules: (logical name, mesh axis or axes), first usable match wins.

  Within a rule, each mesh axis is kept unless an earlier dimension of the same
  array took it or the product of the kept sizes would not divide the dimension;
  a rule that keeps no axis falls through to the next rule of that name. Params
  are sharded over `fsdp` on `embed` and over `tensor` on heads/mlp/vocab;
  activations over `data`+`fsdp`+`expert` on batch and `sequence` on length.

  `additional_rules` (gin) take precedence: a logical name they mention keeps only
  their rules, in their order (so `('vocab', None)` replicates vocab), and a new
  name is added; every other name keeps its standard rules.
  """
  additional = _checked_rules(additional_rules)
  overridden = {name for name, _ in additional}
  return additional + [rule for rule in _STANDARD_RULES if rule[0] not in overridden]


def _checked_rules(rules) -> list[tuple[str, str | tuple[str, ...] | None]]:
  """`rules` as (name, None | axis | tuple of axes) pairs; raises naming a malformed one."""
  checked = []
  for rule in rules:
    valid = (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
             and (rule[1] is None or isinstance(rule[1], (str, tuple, list)))
             and all(a in MESH_AXES for a in mesh_axes(rule[1])))
    if not valid:
      raise ValueError(
          f"standard_logical_axis_rules.additional_rules has the rule {rule!r}; write each "
          f"as (logical name, None | mesh axis | tuple of mesh axes) with mesh axes from "
          f"{MESH_AXES}, e.g. ('vocab', None) or ('embed', ('fsdp', 'tensor')).")
    name, axes = rule
    checked.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return checked


def mesh_axes(axes) -> tuple[str, ...]:
  """A rule's or PartitionSpec entry's mesh axes (None, a name or names) as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names, rules, mesh_shape: dict[str, int], shape=None) -> PartitionSpec:
  """Maps logical axis names (one per dim, None allowed) to a PartitionSpec.

  `mesh_shape` maps mesh axis name -> size. With `shape`, a mesh axis whose
  size does not divide the dimension is dropped (that dim stays replicated).
  Unknown logical names raise, so a typo cannot silently replicate a tensor.
  """
  known = {name for name, _ in rules}
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    if name is not None and name not in known:
      raise ValueError(
          f"logical axis {name!r} has no partitioning rule; add (\"{name}\", mesh_axis) "
          f"to the rules (known: {sorted(known)}).")
    chosen = []
    for rule_name, axes in rules:
      if rule_name != name:
        continue
      size = 1
      for a in mesh_axes(axes):
        fits = shape is None or shape[dim] % (size * mesh_shape.get(a, 1)) == 0
        if mesh_shape.get(a, 1) > 1 and a not in used and fits:
          chosen.append(a)
          size *= mesh_shape[a]
      if chosen:
        break
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)
