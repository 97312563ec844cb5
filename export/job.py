"""The export job: a checkpoint restored through the shared setup path, written as a
Hugging Face transformers directory or as plain ul2x-named safetensors."""

import dataclasses
import functools
import os

import gin
import jax.numpy as jnp

from ul2x.export import files, hf, mappings
from ul2x.export import tokenizer as tokenizer_files
from ul2x.model import TransformerConfig
from ul2x.partitioning.param_names import flat_names
# Registers make_predict_fn, which the serving format calls, before the CLI locks gin.
from ul2x.trainer import predict  # noqa: F401
from ul2x.trainer import record
from ul2x.trainer.console import say
from ul2x.trainer.setup import setup

FORMATS = ("hf", "safetensors", "serving")
DTYPES = ("float32", "bfloat16")
AUTO = "auto"  # export.tokenizer's default: the vocabulary recorded with the checkpoint


def _check(format: str, dtype: str) -> None:
  for name, value, allowed in (("format", format, FORMATS), ("dtype", dtype, DTYPES)):
    if value not in allowed:
      raise ValueError(f"export.{name}={value!r} is not one of {allowed}; set "
                       f"--gin.export.{name} to one of them.")


def _check_serving(options: dict | None, dtype: str) -> None:
  """`export.serving_options` hold `export_serving`'s keyword arguments, at least
  inputs_len and max_decode_len; the serving functions decode in float32."""
  from ul2x.export.serving import OPTIONS  # jax and numpy only
  options = options or {}
  missing = [name for name in ("inputs_len", "max_decode_len") if name not in options]
  if missing:
    raise ValueError(
        f"export.format='serving' needs {' and '.join(missing)} in export.serving_options "
        f"(given: {sorted(options)}); pass e.g. --gin.export.serving_options=\"{{'inputs_len'"
        ": 128, 'max_decode_len': 64}\".")
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"export.serving_options has unknown option(s) {unknown}; the options "
                     f"are {', '.join(OPTIONS)} (docs/serving.md).")
  if dtype != "float32":
    raise ValueError(f"export.format='serving' decodes with float32 parameters, not "
                     f"export.dtype={dtype!r}; leave out --gin.export.dtype (or set "
                     "'float32').")


def _vocabulary(tokenizer: str, cfg: TransformerConfig, checkpoint_path: str,
                step: int | None):
  """What `export.tokenizer` names, checked against the model: a seqio vocabulary, or the
  directory of an import's Hugging Face tokenizer files ('auto': what the checkpoint's
  record names)."""
  from ul2x.tasks import vocabularies  # seqio (TensorFlow): only when tokenizer files are due
  if tokenizer == AUTO:
    saved = record.read(checkpoint_path, step)
    kind = (saved.vocabulary or {}).get("type") if saved else None
    if kind == "hf":
      return saved.file(saved.vocabulary["dir"])
    if kind is None:
      why = ("was saved without a record of its vocabulary" if saved is None else
             "records no vocabulary (imported without tokenizer files)")
      raise ValueError(
          f"checkpoint {checkpoint_path!r} {why}; pass --gin.export.tokenizer=\"'byte'\" "
          "(or the path of its SentencePiece .model) for that vocabulary's tokenizer files, "
          "or --gin.export.tokenizer=None for none.")
    vocab = saved.seqio_vocabulary()
  else:
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
           model_config: TransformerConfig | None = None, format: str = "hf",
           dtype: str = "float32", max_shard_size: int | str = "2GB", step: int | None = None,
           overwrite: bool = False, tokenizer: str | None = "auto",
           serving_options: dict | None = None, mesh=None) -> str:
  """Writes the checkpoint at `checkpoint_path` (a MODEL_DIR, its checkpoints/ or
  checkpoints/N; the latest step unless `step`) to `export_dir`.

  format 'hf': config.json, generation_config.json and model.safetensors for
  transformers' T5ForConditionalGeneration (encoder_decoder) or LlamaForCausalLM
  (decoder_only with RoPE); 'safetensors': tensors named by ul2x parameter path plus
  config.json = the TransformerConfig and {"format": "ul2x"}. Tensors are `dtype`,
  in files of at most `max_shard_size` ('2GB', '500MiB' or bytes) with the HF index
  past one file. With 'hf', `tokenizer` ('auto': the vocabulary recorded with the
  checkpoint; 'byte', the path of a SentencePiece model, or None) adds the transformers
  tokenizer files for that vocabulary. `model_config` None: the checkpoint's recorded
  model, TransformerConfig's gin bindings over it (trainer/record.py). The directory is
  staged beside `export_dir` and renamed into place. 'serving': the `jax.export`
  functions and the TF SavedModel of docs/serving.md, with `serving_options` (at least
  `inputs_len` and `max_decode_len`) passed to `serving.export_serving`. Returns
  `export_dir`."""
  _check(format, dtype)
  if format == "serving":
    _check_serving(serving_options, dtype)
  limit = files.parse_size(max_shard_size)
  model_config = record.model_config(checkpoint_path, model_config, step=step)
  family = mappings.family_for(model_config) if format == "hf" else None
  vocab = (_vocabulary(tokenizer, model_config, checkpoint_path, step)
           if family and tokenizer else None)
  target = (export_dir, overwrite, "EXPORT_DIR", "--gin.export.overwrite=True")
  files.check_target(*target)
  # Restored before anything is created: a wrong model or a damaged checkpoint leaves
  # no directory behind, not even EXPORT_DIR's parent.
  job = setup(model_config, mesh=mesh)
  state = job.restore_state(checkpoint_path, step)
  with files.staged_directory(*target) as staging:
    if isinstance(vocab, str):
      tokenizer_files.copy_tokenizer(staging, vocab)
    elif vocab is not None:
      tokenizer_files.write_tokenizer(staging, vocab,
                                      decoder_only=model_config.architecture == "decoder_only")
    if format == "serving":
      from ul2x.export import serving  # jax.export and TensorFlow: only for this format
      written = serving.export_serving(job, state["params"], staging, **serving_options)
      what = f"serving ({', '.join(sorted(os.path.basename(p) for p in written))})"
    else:
      what = _write_tensors(staging, state["params"], model_config, family, dtype, limit)
  say(f"exported step {int(state['step'])} of {checkpoint_path} to {export_dir}: {what}")
  if family and family.warning:
    say(f"warning: {family.warning}")
  return export_dir


def _write_tensors(staging: str, params, cfg: TransformerConfig, family, dtype: str,
                   limit: int) -> str:
  """The 'hf' (`family`) or plain 'safetensors' files -> a description of them."""
  if family:
    leaves = hf.layer_leaves(params, cfg.scan_layers)
    tensors = hf.to_hf(leaves, family.rules(cfg), family.name)
    configs = {"config.json": {**family.hf_config(cfg), "dtype": dtype},
               "generation_config.json": family.generation_config}
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
  else:
    tensors = {name: functools.partial(lambda x: x, leaf)
               for name, leaf in flat_names(params).items()}
    configs = {"config.json": {**dataclasses.asdict(cfg), "format": "ul2x"}}
    metadata = {"format": "ul2x"}
  tensors = _cast(tensors, jnp.dtype(dtype))
  total = files.write_sharded(staging, tensors, limit, metadata)
  for name, value in configs.items():
    files.write_json(os.path.join(staging, name), value)
  what = f"hf ({family.name})" if family else "safetensors"
  return f"{what}, {dtype}, {len(tensors)} tensors, {total / 1e6:.1f} MB"
