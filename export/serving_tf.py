"""The serving artifact's TF SavedModel: text in, text out for the byte vocabulary, the
tokenization in TF string ops around the greedy decoding that jax2tf serializes natively
(the StableHLO of greedy.jax_exported in one XlaCallModule op), parameters as variables.
"""

import jax
import tensorflow as tf
from jax.experimental import jax2tf

from ul2x.tasks.vocabularies import (PARADIGM_TOKENS, byte_vocabulary, num_sentinels_of,
                                     paradigm_token_id, sentinel_id)

BYTE_OFFSET = 3  # byte-vocabulary id = UTF-8 byte + 3 (tasks/vocabularies.py)


def id_pieces() -> list[bytes]:
  """The bytes each byte-vocabulary id stands for in decoded text, as
  tasks.inference.decode writes them: one byte for ids 3..258, '[S2S]' and its kin for
  the mode tokens, '<extra_id_i>' for sentinel i, nothing for pad, EOS and unk."""
  vocab = byte_vocabulary()
  pieces = [b""] * vocab.vocab_size
  for byte in range(256):
    pieces[byte + BYTE_OFFSET] = bytes([byte])
  for token in PARADIGM_TOKENS:
    pieces[paradigm_token_id(vocab, token)] = token.encode()
  for i in range(num_sentinels_of(vocab)):
    pieces[sentinel_id(vocab, i)] = f"<extra_id_{i}>".encode()
  return pieces


def encode_texts(texts, *, inputs_len: int, mode_token: str | None = None):
  """texts: tf.string [b] -> int32 [b, inputs_len]: `mode_token`'s id (if any), then
  each text's UTF-8 bytes + 3, cut to inputs_len - 1 ids, then EOS, then 0s; what
  tasks.inference.file_examples and predict_batches make of a line of text."""
  vocab = byte_vocabulary()
  # decode_raw pads short texts with 0 bytes and cuts long ones: a dense [b, inputs_len].
  raw = tf.cast(tf.io.decode_raw(texts, tf.uint8, fixed_length=inputs_len), tf.int32)
  count = tf.minimum(tf.strings.length(texts), inputs_len)
  positions = tf.range(inputs_len)
  ids = tf.where(positions[None, :] < count[:, None], raw + BYTE_OFFSET, 0)
  if mode_token is not None:
    leading = tf.fill([tf.shape(ids)[0], 1], paradigm_token_id(vocab, mode_token))
    ids = tf.concat([leading, ids[:, :-1]], axis=1)
    count += 1
  kept = tf.minimum(count, inputs_len - 1)[:, None]
  eos = tf.where(positions[None, :] == kept, vocab.eos_id, 0)
  return tf.where(positions[None, :] < kept, ids, eos)


def decode_ids(ids, pieces):
  """ids: int32 [b, length] -> tf.string [b]: tasks.inference.decode of each row (text
  up to the first EOS, invalid UTF-8 dropped as Python's errors='ignore' drops it)."""
  before_eos = tf.cumsum(tf.cast(ids == byte_vocabulary().eos_id, tf.int32), axis=1) == 0
  text = tf.strings.reduce_join(tf.where(before_eos, tf.gather(pieces, ids), ""), axis=1)
  # The names of reserved ids are ASCII, so dropping invalid bytes from the joined text
  # equals seqio's dropping them run by run between reserved ids.
  return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore")


def save_text_model(serve_greedy, params: dict, directory: str, *, inputs_len: int,
                    mode_token: str | None, platforms: tuple[str, ...],
                    batch_size: int | None = None) -> None:
  """Writes the SavedModel: signature 'serving_default', `inputs` tf.string [b] ->
  {'outputs': tf.string [b], 'scores': float32 [b], 'output_ids': int32 [b,
  max_decode_len]}, b any batch size or `batch_size`. serve_greedy: jitted (params,
  input_ids [b, inputs_len]) -> (ids, scores), as export_serving builds it; params:
  {name: numpy array}."""
  module = tf.Module()
  names = list(params)
  module.params = [tf.Variable(params[name], trainable=False) for name in names]
  polymorphic = [None, "(b, _)" if batch_size is None else None]
  decode = jax2tf.convert(serve_greedy, polymorphic_shapes=polymorphic,
                          native_serialization_platforms=platforms, with_gradient=False)
  pieces = tf.constant(id_pieces())

  @tf.function(input_signature=[tf.TensorSpec([batch_size], tf.string, name="inputs")],
               autograph=False)
  def serve(texts):
    input_ids = encode_texts(texts, inputs_len=inputs_len, mode_token=mode_token)
    output_ids, scores = decode(dict(zip(names, module.params)), input_ids)
    return {"outputs": decode_ids(output_ids, pieces), "scores": scores,
            "output_ids": output_ids}

  _check_runs(serve, batch_size or 1)
  module.serve = serve
  tf.saved_model.save(module, directory, signatures={"serving_default": serve})


def _check_runs(serve, rows: int) -> None:
  """Runs `serve` once: TF reads the StableHLO only when the op first runs, and a
  SavedModel that fails there must not be written."""
  try:
    serve(tf.constant([""] * rows))
  except tf.errors.OpError as e:
    # The MLIR diagnostics name the op and StableHLO versions; the rest is a TF traceback.
    reason = "; ".join(line.split(": error: ", 1)[1] for line in e.message.splitlines()
                       if ": error: " in line) or e.message.strip().splitlines()[-1]
    raise ValueError(
        f"TensorFlow {tf.__version__} cannot run this model's decoding in a SavedModel: "
        f"{reason} (the usual cause: jax {jax.__version__} writes StableHLO ops newer "
        "than this TF's XlaCallModule reads; docs/serving.md). Pass saved_model=False "
        "(export job: --gin.export.serving_options=\"{..., 'saved_model': False}\"): the "
        "jax.export artifact does not need TF.") from None
