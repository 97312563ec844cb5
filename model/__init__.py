"""ul2x.model: Flax NNX transformers, attention, position encodings, losses, FLOP counts."""

from ul2x.model.config import ARCHITECTURES, TransformerConfig
from ul2x.model.transformer import DecoderOnly, EncoderDecoder, build_model
