"""Orbax checkpoints of the train state plus the input pipeline's position."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Periodic, final and keep-N (optionally async) saves under `directory`.

  Each checkpoint holds the train state and, as JSON, the number of batches
  each host has consumed, so a resumed job continues with the next batch.
  """

  def __init__(self, directory: str, *, every: int, max_to_keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state, data_position: dict, *, final: bool = False) -> bool:
    """Saves every `every` steps and at the final step; True if a save started."""
    if step % self.every and not final:
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(dict(data_position))),
        force=True)  # a copy of the position: async saves serialize after the loop moves on

  def restore(self, step: int, abstract_state, shardings):
    """-> (state placed with `shardings`, data position dict)."""
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        shardings)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
