"""The import job: a local Hugging Face transformers directory (T5 v1.1 / UL2 or Llama)
read into a ul2x MODEL_DIR: an orbax checkpoint at step 0, its record (the model and the
tokenizer files it came with, trainer/record.py) and the gin model file."""

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from ul2x.export import files, hf, mappings
from ul2x.model import TransformerConfig, build_model
from ul2x.partitioning.param_names import flat_names, path_name
from ul2x.trainer import record
from ul2x.trainer.checkpoints import Checkpointer

MODEL_GIN = "model.gin"
# The files of a transformers tokenizer, as save_pretrained writes them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "spiece.model", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt")
_FLAGS = ("--model_dir", "--overwrite")  # how the CLI sets the output and its replacement


def model_gin(cfg: TransformerConfig, source: str) -> str:
  """The gin model file of `cfg`: one `TransformerConfig.<field> = value` per field."""
  lines = [f"# The model of {source}, written by python -m ul2x.import_hf."]
  lines += [f"TransformerConfig.{f.name} = {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(cfg)]
  return "\n".join(lines) + "\n"


def _abstract_params(cfg: TransformerConfig) -> dict:
  """The nested params dict of `cfg`'s model, as ShapeDtypeStructs (int layer keys)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))))


def import_hf(hf_dir: str, model_dir: str, *, overwrite: bool = False) -> TransformerConfig:
  """Reads `hf_dir` (config.json and model.safetensors, sharded or not) and writes
  `model_dir/checkpoints/0` (what Setup.restore_state and train.init_checkpoint read),
  its record with the tokenizer files of `hf_dir` (if any; a copy in the step too), and
  `model_dir/model.gin`;
  staged beside `model_dir` and renamed into place. Returns the model's TransformerConfig."""
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{hf_dir} has no config.json; pass --hf_dir a directory written by "
                     "transformers' save_pretrained.")
  config = files.read_json(config_path)
  family = mappings.family_of(config, hf_dir)
  files.check_target(model_dir, overwrite, *_FLAGS)  # before reading the weights
  cfg, tensors = family.from_hf(config, lambda: files.read_directory(hf_dir))
  abstract = _abstract_params(cfg)
  shapes = {name: leaf.shape for name, leaf in flat_names(abstract).items()}
  flat = hf.from_hf(tensors, family.rules(cfg), shapes, family.name)
  params = jax.tree_util.tree_map_with_path(lambda path, _: flat[path_name(path)], abstract)
  with files.staged_directory(model_dir, overwrite, *_FLAGS) as staging:
    tokenizer = [os.path.join(hf_dir, name) for name in TOKENIZER_FILES
                 if os.path.isfile(os.path.join(hf_dir, name))]
    record.write(staging, cfg, hf_tokenizer_files=tokenizer)  # first: the step copies it
    ckpt = Checkpointer(os.path.join(staging, "checkpoints"), every=1, max_to_keep=1,
                        async_save=False)
    ckpt.maybe_save(0, {"step": np.int32(0), "params": params}, {"train_batches": 0},
                    final=True)
    ckpt.close()
    with open(os.path.join(staging, MODEL_GIN), "w") as f:
      f.write(model_gin(cfg, os.path.abspath(hf_dir)))
  if jax.process_index() == 0:
    what = "its tokenizer files" if tokenizer else "no tokenizer (none in --hf_dir)"
    print(f"imported {family.name} from {hf_dir} to {model_dir}: checkpoints/0, "
          f"{record.RECORD} ({what}) and {MODEL_GIN}", flush=True)
  return cfg
