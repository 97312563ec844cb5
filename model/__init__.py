"""ul2x.model: Flax NNX transformers, their contract with the data, attention, position
encodings, losses, FLOP counts."""

from ul2x.model.config import TransformerConfig
from ul2x.model.contract import ARCHITECTURES
from ul2x.model.transformer import DecoderOnly, EncoderDecoder, build_model
