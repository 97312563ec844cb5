"""The step watchdog: a job whose step never finishes (a hung collective, a stuck input
reader) writes every thread's stack to a file and exits, so the scheduler restarts it."""

import contextlib
import faulthandler
import os
import sys
import threading
import time

import jax

from ul2x.trainer.hooks import Hook

HANG_EXIT = 3  # the exit status of a job the watchdog ended


class StepWatchdog(Hook):
  """A hook: within `with`, a daemon thread exits the process (status HANG_EXIT) when no step
  has finished for `timeout_s` seconds (None: never), after writing every thread's
  Python stack to `<directory>/hang-<process>.txt` and one line naming the step and
  that file. Time inside `paused()` (compilation) does not count."""

  def __init__(self, timeout_s: float | None, directory: str, step: int):
    self.timeout_s = timeout_s
    self.path = os.path.join(os.path.abspath(directory), f"hang-{jax.process_index()}.txt")
    self.step, self.paused_depth = step, 0
    self.last = time.monotonic()
    self.done = threading.Event()

  def __enter__(self):
    if self.timeout_s is not None:
      threading.Thread(target=self._watch, name="ul2x-step-watchdog", daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.done.set()

  def around_step(self, step: int, compiling: bool):
    return self.paused(compiling)

  def after(self, info) -> None:
    """Step `info.step` has finished (been dispatched): the clock starts again."""
    self.step, self.last = info.step, time.monotonic()

  @contextlib.contextmanager
  def paused(self, pause: bool = True):
    """The clock stops inside (e.g. the first step, which compiles), and restarts after."""
    self.paused_depth += pause
    try:
      yield
    finally:
      self.paused_depth -= pause
      self.last = time.monotonic()

  def _watch(self):
    while not self.done.wait(min(self.timeout_s, 10.0)):
      if self.paused_depth or time.monotonic() - self.last < self.timeout_s:
        continue
      with open(self.path, "w") as f:
        f.write(f"no step finished within {self.timeout_s:g} s after step {self.step}; "
                "the stack of every thread:\n")
        f.flush()
        faulthandler.dump_traceback(f, all_threads=True)
      print(f"error: no step finished within {self.timeout_s:g} s after step {self.step} "
            f"(train.step_timeout_s); every thread's stack is in {self.path}. Exiting with "
            f"status {HANG_EXIT} so the job can be restarted from its last checkpoint.",
            file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(HANG_EXIT)
