"""Watching the other processes of a multi-host job, so that one that dies is named in
one line within a bounded time.

Without this, a survivor blocks in its next collective until JAX's coordination service
misses the dead process's heartbeats, then aborts with a C++ stack trace that names
neither the process nor the coordinator. Here every process writes a counter into the
coordination service's key-value store every `timeout_s / 10` seconds and reads the
others'; a counter that stops for `timeout_s` (or a store that stops answering: process
0, which hosts it, is gone) prints one line and exits with status 2. JAX's own heartbeat
timeout is set longer (`jax_heartbeat_timeout`), so this fires first. A collective that
fails because a peer died raises in the survivor: the CLI then waits for the watch's
verdict (`wait_for_verdict`) before showing the error. A process that ends normally
writes `done`, so peers still finishing do not take it for dead.
"""

import atexit
import os
import sys
import threading
import time

DONE = "done"
_watch = {}  # 'timeout_s' while this process watches its peers


def jax_heartbeat_timeout(timeout_s: int) -> int:
  """JAX's heartbeat timeout for a job watched with `timeout_s`: later than ours."""
  return timeout_s + 60


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(2)


def _read(client, key: str):
  """The value of `key`, or None if it is not set yet (raises if the store is gone)."""
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # noqa: BLE001  the client raises one type for every status
    if "NOT_FOUND" in str(e):
      return None
    raise


def wait_for_verdict() -> None:
  """Called with an exception in flight (a failed collective, say): in a watched job,
  waits long enough for the watch to name a dead peer and exit; returns if none did (the
  error is this process's own). A no-op in a single-process job."""
  if "timeout_s" in _watch:
    time.sleep(1.5 * _watch["timeout_s"])


def watch_peers(client, process_index: int, process_count: int, coordinator: str,
                timeout_s: float) -> threading.Event:
  """Starts the watch (a daemon thread); -> the event that stops it (set at exit)."""
  me = f"process {process_index} of {process_count}"
  stop = threading.Event()

  def run():
    seen = {j: (None, time.monotonic()) for j in range(process_count) if j != process_index}
    count = 0
    while not stop.wait(timeout_s / 10):
      count += 1
      try:
        client.key_value_set(f"ul2x/alive/{process_index}", str(count), allow_overwrite=True)
        values = {j: _read(client, f"ul2x/alive/{j}") for j in seen}
      except Exception:  # noqa: BLE001
        if stop.is_set():
          return
        _fail(f"{me} lost the coordinator at {coordinator} (process 0): it stopped "
              "answering, so process 0 has died or is unreachable; restart the job, which "
              "resumes from its newest checkpoint.")
      now = time.monotonic()
      for j, value in values.items():
        if value == DONE:
          continue
        last, since = seen[j]
        if value != last:
          seen[j] = (value, now)
        elif now - since > timeout_s and not stop.is_set():
          _fail(f"{me} (coordinator {coordinator}) heard nothing from process {j} for "
                f"{timeout_s:g} s: it has died or hangs; restart the job, which resumes from "
                "its newest checkpoint, or raise --peer_timeout if a process can be busy "
                "that long.")

  def finish():
    stop.set()
    try:
      client.key_value_set(f"ul2x/alive/{process_index}", DONE, allow_overwrite=True)
    except Exception:  # noqa: BLE001  the store may already be gone at exit
      pass

  _watch["timeout_s"] = timeout_s
  threading.Thread(target=run, daemon=True, name="ul2x-peer-watch").start()
  atexit.register(finish)  # runs before jax.distributed's shutdown (registered earlier)
  return stop
