"""The export job: a checkpoint restored through the shared setup path, written as a
Hugging Face transformers directory or as plain ul2x-named safetensors."""

import dataclasses
import functools
import os

import gin
import jax
import jax.numpy as jnp

from ul2x.export import files, hf, mappings
from ul2x.export import tokenizer as tokenizer_files
from ul2x.model import TransformerConfig
from ul2x.trainer.checkpoints import flat_names
from ul2x.trainer.setup import setup

FORMATS = ("hf", "safetensors")
DTYPES = ("float32", "bfloat16")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _check(format: str, dtype: str) -> None:
  for name, value, allowed in (("format", format, FORMATS), ("dtype", dtype, DTYPES)):
    if value not in allowed:
      raise ValueError(f"export.{name}={value!r} is not one of {allowed}; set "
                       f"--gin.export.{name} to one of them.")


def _vocabulary(tokenizer: str, cfg: TransformerConfig):
  """The seqio vocabulary that `export.tokenizer` names, checked against the model."""
  from ul2x.tasks import vocabularies  # seqio (TensorFlow): only when tokenizer files are due
  vocab = (vocabularies.byte_vocabulary() if tokenizer == "byte"
           else vocabularies.sentencepiece_vocabulary(tokenizer))
  if vocab.vocab_size > cfg.vocab_size:
    raise ValueError(
        f"export.tokenizer={tokenizer!r} has {vocab.vocab_size} ids but the model has "
        f"vocab_size={cfg.vocab_size}; name the vocabulary the model was trained with, or "
        "--gin.export.tokenizer=None to write no tokenizer files.")
  return vocab


def _cast(tensors: dict, dtype: jnp.dtype) -> dict:
  """{name: () -> array} with each array cast to `dtype` on its device."""
  return {name: functools.partial(lambda get: get().astype(dtype), get)
          for name, get in tensors.items()}


@gin.configurable
def export(*, checkpoint_path: str, export_dir: str,
           model_config: TransformerConfig = gin.REQUIRED, format: str = "hf",
           dtype: str = "float32", max_shard_size: int | str = "2GB", step: int | None = None,
           overwrite: bool = False, tokenizer: str | None = "byte", mesh=None) -> str:
  """Writes the checkpoint at `checkpoint_path` (a MODEL_DIR, its checkpoints/ or
  checkpoints/N; the latest step unless `step`) to `export_dir`.

  format 'hf': config.json, generation_config.json and model.safetensors for
  transformers' T5ForConditionalGeneration (encoder_decoder) or LlamaForCausalLM
  (decoder_only with RoPE); 'safetensors': tensors named by ul2x parameter path plus
  config.json = the TransformerConfig and {"format": "ul2x"}. Tensors are `dtype`,
  in files of at most `max_shard_size` ('2GB', '500MiB' or bytes) with the HF index
  past one file. With 'hf', `tokenizer` ('byte', the path of a SentencePiece model, or
  None) adds the transformers tokenizer files for that vocabulary. The directory is
  staged beside `export_dir` and renamed into place. Returns `export_dir`."""
  _check(format, dtype)
  limit = files.parse_size(max_shard_size)
  family = mappings.family_for(model_config) if format == "hf" else None
  hf_config = family.hf_config(model_config) if family else None
  vocab = _vocabulary(tokenizer, model_config) if family and tokenizer else None
  with files.staged_directory(export_dir, overwrite, "EXPORT_DIR",
                              "--gin.export.overwrite=True") as staging:
    if vocab is not None:
      tokenizer_files.write_tokenizer(staging, vocab)
    job = setup(model_config, mesh=mesh)
    state = job.restore_state(checkpoint_path, step)
    at = int(state["step"])
    if family:
      leaves = hf.layer_leaves(state["params"], model_config.scan_layers)
      tensors = hf.to_hf(leaves, family.rules(model_config), family.name)
      configs = {"config.json": {**hf_config, "dtype": dtype},
                 "generation_config.json": family.generation_config}
      metadata = {"format": "pt"}  # transformers refuses safetensors without it
    else:
      tensors = {name: functools.partial(lambda x: x, leaf)
                 for name, leaf in flat_names(state["params"]).items()}
      configs = {"config.json": {**dataclasses.asdict(model_config), "format": "ul2x"}}
      metadata = {"format": "ul2x"}
    tensors = _cast(tensors, jnp.dtype(dtype))
    total = files.write_sharded(staging, tensors, limit, metadata)
    for name, value in configs.items():
      files.write_json(os.path.join(staging, name), value)
  what = f"{format} ({family.name})" if family else format
  _say(f"exported step {at} of {checkpoint_path} to {export_dir}: {what}, {dtype}, "
       f"{len(tensors)} tensors, {total / 1e6:.1f} MB")
  if family and family.warning:
    _say(f"warning: {family.warning}")
  return export_dir
