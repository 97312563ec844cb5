"""The jobs' console lines: printed by process 0 only, so many hosts print each once."""

import jax


def say(message: str, end: str = "\n") -> None:
  if jax.process_index() == 0:
    print(message, end=end, flush=True)
