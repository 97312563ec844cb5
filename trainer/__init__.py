"""ul2x.trainer: train state, optimizer, jitted steps, the loop, metrics, checkpoints."""

from ul2x.trainer.loop import train
