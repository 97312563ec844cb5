"""Parameter names: a pytree leaf's path as 'decoder/layers/0/mlp/wi_0/kernel', the one
spelling that checkpoint restores (shape checks, fine-tuning's assignment map), the export
and import mappings, the serving artifact and the partitioning report share."""

import jax


def path_name(path) -> str:
  """A pytree key path (as jax.tree_util's `*_with_path` functions give it) as
  'params/decoder/layers/0/mlp/wi_0/kernel': dict keys and sequence indices joined by '/'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def flat_names(tree) -> dict:
  """{'encoder/layers/0/mlp/wi_0/kernel': leaf} of `tree`, in the order jax flattens it
  (so `jax.tree.unflatten(jax.tree.structure(tree), list(values))` rebuilds it)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(path): leaf for path, leaf in leaves}
