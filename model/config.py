"""Transformer hyper-parameters shared by the encoder-decoder and decoder-only models."""

import dataclasses

import gin
import jax.numpy as jnp

ARCHITECTURES = ("encoder_decoder", "decoder_only")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """T5 v1.1 / UL2-style transformer settings.

  `dtype` is the activation dtype; parameters are always float32 and logits
  are float32. `position` is 'relative' (T5 bucketed bias) or 'rope'.
  `attention` names the attention implementation (see model/attention.py).
  """

  architecture: str = "encoder_decoder"
  vocab_size: int = 384
  emb_dim: int = 64
  num_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  activation: str = "gelu"
  dropout_rate: float = 0.0
  tie_embeddings: bool = False
  dtype: str = "float32"
  position: str = "relative"
  relative_buckets: int = 32
  relative_max_distance: int = 128
  rope_max_wavelength: float = 10_000.0
  attention: str = "reference"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    checks = [
        ("architecture", self.architecture, ARCHITECTURES),
        ("activation", self.activation, ("gelu", "silu")),
        ("dtype", self.dtype, ("float32", "bfloat16")),
        ("position", self.position, ("relative", "rope")),
    ]
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(
            f"TransformerConfig.{name}={value!r} is not one of {allowed}; "
            f"set --gin.TransformerConfig.{name} to one of them.")
    if self.position == "rope" and self.architecture != "decoder_only":
      raise ValueError(
          "TransformerConfig.position='rope' is supported for decoder_only models; "
          "use position='relative' for encoder_decoder.")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)
