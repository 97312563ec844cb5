"""Transformer hyper-parameters shared by the encoder-decoder and decoder-only models."""

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp

from ul2x.model.contract import ARCHITECTURES
from ul2x.model.layers import ACTIVATIONS
from ul2x.model.moe import DISPATCHES, GROUPED_MATMULS, ROUTERS, expert_capacity

# What a rematerialised layer keeps from its forward pass for the backward: nothing
# (`full`: every layer is recomputed), the matmul outputs (`dots_saveable`), or
# those without batch dimensions; `none` keeps everything (no remat).
REMAT_POLICIES = {
    "none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> None:
  """Raises one line naming the gin parameter `name`, its `value` and the valid range
  unless `value` is a finite number (an integer if `integer`) within [low, high]
  (each end open if `low_open` / `high_open`; None: unbounded)."""
  number = isinstance(value, int) if integer else isinstance(value, (int, float))
  inside = (number and not isinstance(value, bool) and math.isfinite(value)
            and (low is None or value > low or (value == low and not low_open))
            and (high is None or value < high or (value == high and not high_open)))
  if not inside:
    kind = "an integer" if integer else "a number"
    span = (f"{'(' if low_open or low is None else '['}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
    raise ValueError(f"{name}={value!r} must be {kind} in {span}; set --gin.{name} to "
                     "one in that range.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """T5 v1.1 / UL2-style transformer settings.

  `dtype` is the activation dtype; parameters are always float32 and logits
  are float32. `position` is 'relative' (T5 bucketed bias) or 'rope'.
  `attention` names the attention implementation (see model/attention.py); with
  'ring', `ring_load_balance` lays causal stacks out in zigzag order over the
  `sequence` mesh axis (docs/ring_attention.md).
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
  ring_load_balance: bool = True
  remat: bool | str = False  # a REMAT_POLICIES name; True is 'full', False 'none'
  scan_layers: bool = False
  # Mixture of experts (docs/moe.md); num_experts=0 is a dense model.
  num_experts: int = 0
  moe_layer_interval: int = 2
  expert_mlp_dim: int = 0
  capacity_factor: float = 2.0
  group_size: int = 256
  encoder_router: str = "expert_choice"
  decoder_router: str = "top2"
  router_jitter: float = 0.0
  moe_dispatch: str = "gather"
  moe_matmul: str = "ragged_dot"

  def __post_init__(self):
    checks = [
        ("architecture", self.architecture, ARCHITECTURES),
        ("activation", self.activation, tuple(ACTIVATIONS)),
        ("dtype", self.dtype, ("float32", "bfloat16")),
        ("position", self.position, ("relative", "rope")),
        ("remat", self.remat_policy, tuple(REMAT_POLICIES)),
    ]
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(
            f"TransformerConfig.{name}={value!r} is not one of {allowed}; "
            f"set --gin.TransformerConfig.{name} to one of them.")
    check_range("TransformerConfig.dropout_rate", self.dropout_rate, 0, 1, high_open=True)
    check_range("TransformerConfig.rope_max_wavelength", self.rope_max_wavelength, 0,
                low_open=True)
    if self.position == "rope" and self.architecture != "decoder_only":
      raise ValueError(
          "TransformerConfig.position='rope' is supported for decoder_only models; "
          "use position='relative' for encoder_decoder.")
    if self.num_experts:
      self._check_moe()

  def _check_moe(self):
    for name, allowed in [("encoder_router", ROUTERS), ("decoder_router", ROUTERS),
                          ("moe_dispatch", DISPATCHES), ("moe_matmul", GROUPED_MATMULS)]:
      if getattr(self, name) not in allowed:
        raise ValueError(
            f"TransformerConfig.{name}={getattr(self, name)!r} is not one of {allowed}; "
            f"set --gin.TransformerConfig.{name} to one of them.")
    if self.decoder_router == "expert_choice":
      raise ValueError(
          "TransformerConfig.decoder_router='expert_choice' would leak future tokens: each "
          "expert picks its top tokens among the whole group, so in a causal decoder a "
          "token's output would depend on later tokens; use 'top1' or 'top2' for the "
          "decoder (expert choice is for the bidirectional encoder_router).")
    stacks = [("num_decoder_layers", self.num_decoder_layers)]
    if self.architecture == "encoder_decoder":
      stacks.append(("num_encoder_layers", self.num_encoder_layers))
    for name, layers in stacks:
      if self.moe_layer_interval < 1 or layers % self.moe_layer_interval:
        raise ValueError(
            f"TransformerConfig.{name}={layers} is not a multiple of moe_layer_interval="
            f"{self.moe_layer_interval} (the last of every {self.moe_layer_interval} layers "
            "is MoE); change --gin.TransformerConfig.moe_layer_interval or the depth.")
    check_range("TransformerConfig.group_size", self.group_size, 1, integer=True)
    check_range("TransformerConfig.capacity_factor", self.capacity_factor, 0, low_open=True)
    check_range("TransformerConfig.router_jitter", self.router_jitter, 0, 1, high_open=True)
    if self.moe_dispatch != "dropless":  # dropless has no capacity
      expert_capacity(self.group_size, self.num_experts, self.capacity_factor)
    elif self.architecture == "encoder_decoder" and self.encoder_router == "expert_choice":
      raise ValueError(
          "TransformerConfig.moe_dispatch='dropless' is for token-choice routers, but "
          "encoder_router='expert_choice' (expert choice drops no choice by construction); "
          "set --gin.TransformerConfig.encoder_router='top2' (or 'top1'), or "
          "moe_dispatch='gather'.")

  @property
  def remat_policy(self) -> str:
    """`remat` as a `REMAT_POLICIES` name."""
    return {True: "full", False: "none"}.get(self.remat, self.remat)

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)
