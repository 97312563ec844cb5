"""The one generic Hugging Face converter: applies a model family's mapping table
(export/mappings.py) from ul2x parameters to HF tensors or back.

A table is a list of `Rule(ours, hf, transform)`: a ul2x parameter path and an HF
tensor name, both patterns where `{i}` stands for a layer index, and the change of
layout between them. Export walks the table in order (so files list tensors in table
and layer order, whatever the checkpoint's layout); import looks each HF tensor up.
Either way every parameter on the source side must be claimed by a rule.
"""

import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ul2x.partitioning.param_names import flat_names


class Transform(NamedTuple):
  """A tensor's change of layout between ul2x and HF, in both directions."""

  to_hf: Callable  # our array -> HF array
  from_hf: Callable  # (HF array, our shape) -> our array


class Rule(NamedTuple):
  ours: str  # 'decoder/layers/{i}/mlp/wo/kernel'
  hf: str  # 'model.layers.{i}.mlp.down_proj.weight'
  transform: Transform


COPY = Transform(lambda x: x, lambda y, shape: jnp.reshape(y, shape))


def scaled(scale: float) -> Transform:
  """HF = ours * scale, same layout."""
  s = np.float32(scale)
  return Transform(lambda x: x * s, lambda y, shape: jnp.reshape(y / s, shape))


def linear(n_in: int = 1, scale: float = 1.0) -> Transform:
  """Our kernel [*in (n_in dims), *out] <-> a torch Linear weight [prod(out), prod(in)]
  (torch stores [out, in]), times `scale`: e.g. a query kernel [emb, heads, head_dim]
  <-> [heads * head_dim, emb]."""
  s = np.float32(scale)

  def to_hf(x):
    return jnp.transpose(jnp.reshape(x, (math.prod(x.shape[:n_in]), -1))) * s

  def from_hf(y, shape):
    return jnp.reshape(jnp.transpose(y / s), shape)

  return Transform(to_hf, from_hf)


@functools.cache
def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def layer_leaves(params: dict, scan_layers: bool) -> dict[str, Callable]:
  """{'encoder/layers/0/mlp/wo/kernel': () -> array} of a nested params dict; scanned
  stacks `encoder/layers/x` [layers, ...] are split into one lazy slice per layer."""
  out = {}
  for name, leaf in flat_names(params).items():
    stack, sep, rest = name.partition("/layers/")
    if scan_layers and sep and "/" not in stack:
      for i in range(leaf.shape[0]):
        out[f"{stack}/layers/{i}/{rest}"] = functools.partial(lambda x, i: x[i], leaf, i)
    else:
      out[name] = functools.partial(lambda x: x, leaf)
  return out


def to_hf(leaves: dict[str, Callable], rules: list[Rule], family: str) -> dict[str, Callable]:
  """{ul2x name: () -> array} -> {HF name: () -> array}, in table then layer order."""
  out, claimed = {}, set()
  for rule in rules:
    matches = [m for m in map(_pattern(rule.ours).fullmatch, leaves) if m]
    for m in sorted(matches, key=lambda m: int(m.groupdict().get("i") or 0)):
      get = leaves[m.string]
      out[rule.hf.format(**m.groupdict())] = functools.partial(
          lambda get, f: f(get()), get, rule.transform.to_hf)
      claimed.add(m.string)
  for name in leaves:
    if name not in claimed:
      raise ValueError(f"ul2x parameter {name!r} has no Hugging Face name in the {family} "
                       "mapping (export/mappings.py); export with format='safetensors'.")
  return out


def from_hf(tensors: dict[str, np.ndarray], rules: list[Rule], shapes: dict[str, tuple],
            family: str) -> dict[str, jax.Array]:
  """{HF name: array} -> {ul2x name: float32 array of shapes[name]}; raises naming an HF
  tensor no rule claims, one of the wrong shape, or a ul2x parameter left unfilled."""
  out = {}
  for name, array in tensors.items():
    found = [(r, m) for r in rules if (m := _pattern(r.hf).fullmatch(name))]
    target = found[0][0].ours.format(**found[0][1].groupdict()) if found else None
    if target not in shapes:
      raise ValueError(f"Hugging Face tensor {name!r} {tuple(array.shape)} has no ul2x "
                       f"parameter in the {family} mapping (export/mappings.py); ul2x "
                       "models have no biases and no other extra weights.")
    transform = found[0][0].transform
    spec = jax.ShapeDtypeStruct(shapes[target], jnp.float32)
    expected = jax.eval_shape(transform.to_hf, spec).shape
    if tuple(array.shape) != expected:
      raise ValueError(f"Hugging Face tensor {name!r} has shape {tuple(array.shape)}, but its "
                       f"config.json implies {expected}; the config does not match the weights.")
    out[target] = transform.from_hf(jnp.asarray(array, jnp.float32), shapes[target])
  missing = [name for name in shapes if name not in out]
  if missing:
    raise ValueError(f"the Hugging Face checkpoint lacks {len(missing)} tensor(s) the "
                     f"{family} mapping needs for ul2x parameters, first {missing[0]!r}; "
                     "is the checkpoint complete?")
  return out
