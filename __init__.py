"""ul2x: JAX/Flax sharded training of UL2/T5 models in the T5X tradition."""

import os
import sys

__version__ = "0.1.0"

ROOT = os.path.dirname(os.path.abspath(__file__))
# What the repository root holds: reached as ul2x.<name>, never as a top-level module.
OWN_NAMES = frozenset({
    "bench", "docs", "export", "gin_configs", "kernels", "locks", "model", "partitioning",
    "runs", "tasks", "tests", "trainer", "eval", "gin_setup", "import_hf", "infer", "lm_eval",
    "train"})


class _WithoutOwnNames:
  """The root's path-entry finder, less our names: a user's module beside them (a task
  module run from the root, docs/data.md) still imports; `kernels` is Hugging Face's."""

  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, fullname, target=None):
    if fullname in OWN_NAMES:
      return None
    return self.finder.find_spec(fullname, target)

  def invalidate_caches(self):
    self.finder.invalidate_caches()


def _hide_own_names() -> None:
  """`python -m ...` and `python -m pytest` started in the repository root put the root on
  `sys.path`, where our folders would shadow other libraries' modules (transformers 5
  probes Hugging Face's `kernels`). ul2x itself is found through its install."""
  spellings = [i for i, entry in enumerate(sys.path)
               if os.path.abspath(entry or os.curdir) == ROOT]
  if not spellings:
    return
  for i in spellings:  # one spelling, so one finder in the cache ('' is keyed by the cwd)
    sys.path[i] = ROOT
  if isinstance(sys.path_importer_cache.get(ROOT), _WithoutOwnNames):
    return
  for hook in sys.path_hooks:
    try:
      finder = hook(ROOT)
    except ImportError:
      continue
    sys.path_importer_cache[ROOT] = _WithoutOwnNames(finder)
    return


_hide_own_names()
