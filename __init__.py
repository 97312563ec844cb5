"""ul2x: JAX/Flax sharded training of UL2/T5 models in the T5X tradition."""

__version__ = "0.1.0"
