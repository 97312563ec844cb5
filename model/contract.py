"""The models' contract with their batches (T5X's models.py): per architecture the seqio
feature converter that makes its batches; the features every architecture reads, with
the one derivation of segment ids and positions for unpacked batches and the one layout
of prompts for decoding; and the loss. tasks/pipeline.py builds batches by it,
model/transformer.py and trainer/steps.py read and score them by it, tasks/inference.py
and export/serving.py lay out prompts by it."""

import dataclasses

import jax.numpy as jnp

from ul2x.model.losses import cross_entropy_sums


@dataclasses.dataclass(frozen=True)
class Contract:
  """converter: the seqio feature converter (a class name in `seqio`) for a task with
  `inputs`; lm_converter: the one for a task without, None where the architecture
  needs inputs."""

  converter: str
  lm_converter: str | None


CONTRACTS = {
    # encoder_input_tokens; decoder_{input,target}_tokens, decoder_loss_weights.
    "encoder_decoder": Contract("EncDecFeatureConverter", None),
    # decoder_{input,target}_tokens = inputs + targets, decoder_loss_weights on the targets,
    # decoder_causal_attention = 1 on the bidirectional prefix (a prefix LM); a task
    # without inputs is a fully causal LM, without decoder_causal_attention.
    "decoder_only": Contract("PrefixLMFeatureConverter", "LMFeatureConverter"),
}
ARCHITECTURES = tuple(CONTRACTS)

TARGETS = "decoder_target_tokens"
LOSS_WEIGHTS = "decoder_loss_weights"
# Each stack's token feature: packed batches carry `{stack}_segment_ids` and
# `{stack}_positions` for it; unpacked ones get them from `unpacked_segments_positions`.
STACK_TOKENS = {"encoder": "encoder_input_tokens", "decoder": TARGETS}


def contract_for(architecture: str) -> Contract:
  if architecture not in CONTRACTS:
    raise ValueError(f"architecture {architecture!r} is not supported; use one of "
                     f"{ARCHITECTURES}.")
  return CONTRACTS[architecture]


def unpacked_segments_positions(tokens, xp=jnp):
  """What packing would give a row holding one example: tokens int [..., len] (0 =
  padding, at the end) -> (segment ids 1 on tokens, positions 0, 1, ... on tokens;
  both 0 on padding), int32 [..., len]. `xp`: the array namespace of `tokens`
  (jax.numpy, numpy, or tensorflow.experimental.numpy inside a tf.data map)."""
  segment_ids = xp.asarray(tokens != 0, dtype=xp.int32)
  return segment_ids, segment_ids * xp.arange(tokens.shape[-1], dtype=xp.int32)


def prompt_features(architecture: str, inputs, xp=jnp, *, causal: bool = False) -> dict:
  """The batch `model.init_decoding` takes for prompts: inputs int [..., inputs_len], each
  row its ids then 0s -> encoder_decoder {'encoder_input_tokens': inputs}; decoder_only,
  as the PrefixLM converter lays out a row in training, P the row's non-zero ids, each
  int32 [..., 1 + inputs_len]: `decoder_input_tokens` [0, x_0 .. x_{P-1}, 0 ...],
  `decoder_segment_ids` 1 on those P + 1 positions, `decoder_causal_attention` the same
  1s (the bidirectional prefix), or with `causal` (a causal LM's prompt) all 0. `xp`:
  the array namespace of `inputs` (jax.numpy, or numpy)."""
  if architecture == "encoder_decoder":
    return {STACK_TOKENS["encoder"]: inputs}
  start = xp.zeros((*inputs.shape[:-1], 1), dtype=inputs.dtype)  # inputs_len may be 0
  tokens = xp.concatenate([start, inputs], axis=-1)
  length = xp.sum(xp.asarray(inputs != 0, dtype=xp.int32), axis=-1)
  segment_ids = xp.asarray(xp.arange(tokens.shape[-1]) <= length[..., None], dtype=xp.int32)
  return {"decoder_input_tokens": tokens, "decoder_segment_ids": segment_ids,
          "decoder_causal_attention": xp.zeros_like(segment_ids) if causal else segment_ids}


def loss_sums(logits, batch, z_loss: float) -> dict:
  """The loss of both architectures, as token sums (model/losses.py): cross-entropy of
  logits [batch, len, vocab] against `decoder_target_tokens`, weighted by
  `decoder_loss_weights`."""
  return cross_entropy_sums(logits, batch[TARGETS], batch[LOSS_WEIGHTS], z_loss)
