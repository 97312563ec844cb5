"""`train.profile_steps`: a jax.profiler trace of chosen train steps, for TensorBoard's
profile plugin (xprof)."""

import contextlib

import jax

from ul2x.trainer.console import say
from ul2x.trainer.hooks import Hook


def check_profile_steps(profile_steps, train_steps: int) -> None:
  """Raises unless `profile_steps` is None, () or (first, last) with
  1 <= first <= last <= train_steps."""
  if profile_steps is None or profile_steps == ():
    return
  valid = (isinstance(profile_steps, (tuple, list)) and len(profile_steps) == 2
           and all(isinstance(s, int) and not isinstance(s, bool) for s in profile_steps))
  if not valid or not 1 <= profile_steps[0] <= profile_steps[1] <= train_steps:
    raise ValueError(
        f"train.profile_steps={profile_steps!r} is not (first, last) with "
        f"1 <= first <= last <= train_steps={train_steps}; e.g. "
        "--gin.train.profile_steps=(10, 12) traces steps 10 to 12, None traces none.")


class StepProfiler(Hook):
  """A hook that traces the steps first..last (those of them a run from `start` takes) into
  `directory`, each step annotated for the profile plugin's step view."""

  def __init__(self, profile_steps, directory: str, start: int):
    first, self.last = profile_steps or (0, -1)
    self.first = max(first, start + 1)
    self.directory = directory
    self.tracing = False

  def __exit__(self, *exc):
    self._stop()

  @contextlib.contextmanager
  def around_step(self, step: int, compiling: bool):
    if step == self.first and step <= self.last:
      jax.profiler.start_trace(self.directory)
      self.tracing = True
    if not self.tracing:
      yield
      return
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after(self, info) -> None:
    """Ends the trace after its last step, once that step's outputs are computed."""
    if self.tracing and info.step == self.last:
      jax.block_until_ready(info.metrics)
      self._stop()
      say(f"profile of steps {self.first}-{self.last}: {self.directory} (TensorBoard's "
          "Profile tab, with the tensorboard-plugin-profile package)")

  def _stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
