"""The models' contract with their batches (T5X's models.py): per architecture the seqio
feature converter that makes its batches; the features every architecture reads, with
the one derivation of segment ids and positions for unpacked batches; and the loss.
tasks/pipeline.py builds batches by it, model/transformer.py and trainer/steps.py read
and score them by it."""

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


def loss_sums(logits, batch, z_loss: float) -> dict:
  """The loss of both architectures, as token sums (model/losses.py): cross-entropy of
  logits [batch, len, vocab] against `decoder_target_tokens`, weighted by
  `decoder_loss_weights`."""
  return cross_entropy_sums(logits, batch[TARGETS], batch[LOSS_WEIGHTS], z_loss)
