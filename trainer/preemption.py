"""Preemption: SIGTERM / SIGINT ask the train loop to finish its step, save and exit 0;
on many hosts every process agrees on the step to stop at."""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """While entered, the signals set `signal_name` instead of killing the process; a
  second SIGINT interrupts at once (KeyboardInterrupt), for an impatient Ctrl-C."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    """True on every process once any process has been signalled (a collective when
    there are several processes, so each process must call it at the same steps)."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
