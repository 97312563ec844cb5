"""What a checkpoint is: MODEL_DIR/ul2x_model.json records the model config, the
vocabulary (its SentencePiece file copied beside it), the task, its mode tokens and
feature lengths, so that infer, eval, export and fine-tuning need only the checkpoint's
path; each saved step carries a copy (checkpoints/N/record/, `files`), so a step's
directory copied alone describes itself too. `model_config` reconciles the record with a
gin model, if one is given, `job_settings` fills in what a job leaves to the record and
`text_vocabulary` says how a prompts file's text becomes ids. For checkpoints saved
before records, `trained_mode_token` reads the run's MODEL_DIR/config.gin instead."""

import ast
import dataclasses
import json
import os
import shutil

import gin

from ul2x.model import TransformerConfig
from ul2x.trainer import checkpoints
from ul2x.trainer.console import say

RECORD = checkpoints.RECORD  # "ul2x_model.json"
SPIECE = "spiece.model"
HF_TOKENIZER = "hf_tokenizer"  # an import's Hugging Face tokenizer files, copied
# Fields that fix the parameters or the function the checkpoint computes: a gin model may
# not change them. The others (attention, remat, dtype, MoE dispatch, ...) say how to run
# it, and a gin binding overrides them.
FIXED = ("architecture", "vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
         "num_encoder_layers", "num_decoder_layers", "activation", "tie_embeddings",
         "position", "relative_buckets", "relative_max_distance", "rope_max_wavelength",
         "scan_layers", "num_experts", "moe_layer_interval", "expert_mlp_dim",
         "encoder_router", "decoder_router")
# A job's mode_token default: the mode token of the task the checkpoint was trained on.
TRAINED_MODE_TOKEN = "auto"
# What a job may leave to the record: (what it is, the macro that sets it, an example).
LEFT_TO_RECORD = {"task": ("task", "MIXTURE_OR_TASK_NAME", "'my_task'"),
                  "task_feature_lengths": ("feature lengths", "TASK_FEATURE_LENGTHS",
                                           "{'inputs': 128, 'targets': 64}")}


@dataclasses.dataclass(frozen=True)
class Record:
  """A checkpoint's record. vocabulary: {'type': 'byte'}, {'type': 'sentencepiece',
  'file': SPIECE, 'extra_ids': n}, {'type': 'hf', 'dir': HF_TOKENIZER} (an import's
  tokenizer files) or None (unknown: an import without tokenizer files). mode_tokens:
  the distinct mode tokens that lead the task's inputs (None for a task without)."""

  path: str  # of the record file
  config: TransformerConfig
  vocabulary: dict | None
  task: str | None = None
  mode_tokens: tuple = ()
  task_feature_lengths: dict | None = None

  def file(self, name: str) -> str:
    """A file stored beside the record."""
    return os.path.join(os.path.dirname(self.path), name)

  def seqio_vocabulary(self):
    """The seqio vocabulary of a 'byte' or 'sentencepiece' record, else None."""
    from ul2x.tasks import vocabularies  # seqio (TensorFlow): only when it is asked for
    kind = (self.vocabulary or {}).get("type")
    if kind == "byte":
      return vocabularies.byte_vocabulary()
    if kind == "sentencepiece":
      return vocabularies.sentencepiece_vocabulary(self.file(self.vocabulary["file"]),
                                                   self.vocabulary["extra_ids"])
    return None


def write(model_dir: str, cfg: TransformerConfig, *, vocabulary=None,
          hf_tokenizer_files: list[str] | None = None, task: str | None = None,
          mode_tokens=(), task_feature_lengths: dict | None = None) -> None:
  """Writes MODEL_DIR/ul2x_model.json (and copies the vocabulary's file beside it).
  vocabulary: a seqio vocabulary (byte or SentencePiece; another kind is recorded as
  unknown); hf_tokenizer_files: an import's tokenizer files, copied to HF_TOKENIZER/."""
  vocab = None
  if hf_tokenizer_files:
    os.makedirs(os.path.join(model_dir, HF_TOKENIZER), exist_ok=True)
    for path in hf_tokenizer_files:
      shutil.copy(path, os.path.join(model_dir, HF_TOKENIZER, os.path.basename(path)))
    vocab = {"type": "hf", "dir": HF_TOKENIZER}
  elif vocabulary is not None:
    import seqio  # TensorFlow: only training, which has it loaded, passes a vocabulary
    if isinstance(vocabulary, seqio.ByteVocabulary):
      vocab = {"type": "byte"}
    elif isinstance(vocabulary, seqio.SentencePieceVocabulary):
      shutil.copy(vocabulary.sentencepiece_model_file, os.path.join(model_dir, SPIECE))
      vocab = {"type": "sentencepiece", "file": SPIECE, "extra_ids": vocabulary.extra_ids}
  record = {"model": dataclasses.asdict(cfg), "vocabulary": vocab, "task": task,
            "mode_tokens": list(mode_tokens),
            "task_feature_lengths": dict(task_feature_lengths or {}) or None}
  with open(os.path.join(model_dir, RECORD), "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")


def model_dir_of(checkpoint_path: str, step: int | None = None) -> str:
  """The MODEL_DIR of a checkpoint path (a MODEL_DIR, its checkpoints/ or checkpoints/N);
  a MODEL_DIR with a record and no checkpoint yet (a hook in its first steps) is one too."""
  if step is None and os.path.isfile(os.path.join(checkpoint_path, RECORD)):
    return checkpoint_path
  directory, _ = checkpoints.find_checkpoint(checkpoint_path, step)
  return _parent(directory)


def _parent(directory: str) -> str:
  """The MODEL_DIR of a checkpoints directory."""
  return os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory


def _record_path(checkpoint_path: str, step: int | None) -> str:
  """The step's own copy of the record if it has one, else its MODEL_DIR's record file
  (which may not exist)."""
  try:
    directory, found = checkpoints.find_checkpoint(checkpoint_path, step)
  except ValueError:
    if step is None and os.path.isfile(os.path.join(checkpoint_path, RECORD)):
      return os.path.join(checkpoint_path, RECORD)  # a MODEL_DIR with no checkpoint yet
    raise
  own = os.path.join(directory, str(found), checkpoints.RECORD_ITEM, RECORD)
  return own if os.path.isfile(own) else os.path.join(_parent(directory), RECORD)


def read(checkpoint_path: str, step: int | None = None) -> Record | None:
  """The record of the checkpoint at `checkpoint_path` (its step's own copy, else its
  MODEL_DIR's), or None for a checkpoint saved without one (before records were
  written)."""
  path = _record_path(checkpoint_path, step)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  try:
    cfg = TransformerConfig(**record["model"])
  except TypeError as e:
    raise ValueError(f"{path} records a model config this ul2x cannot read ({e}); pass the "
                     "gin model file the checkpoint was trained with.") from None
  return Record(path, cfg, record.get("vocabulary"), record.get("task"),
                tuple(record.get("mode_tokens") or ()), record.get("task_feature_lengths"))


def text_vocabulary(checkpoint_path: str, step: int | None = None):
  """The vocabulary a prompts file's text is encoded with and predictions decoded with:
  the recorded one (an import's Hugging Face tokenizer as a `vocabularies.HFTokenizer`),
  bytes for a checkpoint saved without a record, or for an import without tokenizer
  files whose model has the byte vocabulary's size (ByT5's). Raises in one line where
  that cannot be done faithfully: no tokenizer files, or a tokenizer whose EOS is not id
  1 or that starts text with a BOS other than 0 (ul2x decodes until id 1, from id 0)."""
  from ul2x.tasks import vocabularies  # seqio (TensorFlow): only when it is asked for
  saved = read(checkpoint_path, step)
  if saved is None:
    return vocabularies.byte_vocabulary()
  kind = (saved.vocabulary or {}).get("type")
  if kind == "hf":
    tokenizer = vocabularies.HFTokenizer(saved.file(saved.vocabulary["dir"]))
    if tokenizer.eos_id != 1 or tokenizer.bos_id not in (None, 0):
      raise ValueError(
          f"checkpoint {checkpoint_path!r} records a Hugging Face tokenizer "
          f"({tokenizer.directory}) with EOS id {tokenizer.eos_id} and BOS id "
          f"{tokenizer.bos_id}, but ul2x decodes from id 0 until EOS id 1; run the model "
          "in transformers, or import one with T5's ids (pad 0, EOS 1, no BOS).")
    if tokenizer.vocab_size > saved.config.vocab_size:
      raise ValueError(
          f"checkpoint {checkpoint_path!r} records a Hugging Face tokenizer "
          f"({tokenizer.directory}) of {tokenizer.vocab_size} ids, more than the model's "
          f"vocab_size={saved.config.vocab_size}; import the tokenizer the model came with.")
    return tokenizer
  vocab = saved.seqio_vocabulary()
  if vocab is not None:
    return vocab
  if kind is not None:
    raise ValueError(f"checkpoint {checkpoint_path!r} records a vocabulary of type {kind!r}, "
                     "which this ul2x cannot read; use the ul2x that saved it.")
  byte = vocabularies.byte_vocabulary()
  if saved.config.vocab_size == byte.vocab_size:
    say(f"infer: {checkpoint_path!r} records no vocabulary; its {byte.vocab_size} ids are read "
        "as the byte vocabulary's (ByT5's)")
    return byte
  raise ValueError(
      f"checkpoint {checkpoint_path!r} records no vocabulary (e.g. imported without tokenizer "
      f"files) and has vocab_size={saved.config.vocab_size}, not the byte vocabulary's "
      f"{byte.vocab_size}; import it again from a directory holding its tokenizer files "
      "(tokenizer.json or spiece.model and tokenizer_config.json).")


def _check(record: Record, values: dict, what: str) -> None:
  """Raises naming the first field in FIXED where `values` contradict the record."""
  for name in FIXED:
    if name in values and values[name] != getattr(record.config, name):
      raise ValueError(
          f"{what} sets TransformerConfig.{name}={values[name]!r}, but the checkpoint was "
          f"trained with {name}={getattr(record.config, name)!r} ({record.path}); drop the "
          "model gin file or binding: the recorded model is used without one.")


def model_config(checkpoint_path: str, given: TransformerConfig | None = None, *,
                 step: int | None = None, fixed: bool = True) -> TransformerConfig:
  """The model to restore `checkpoint_path` into. `given` (a config built in code) is
  used as it is; None (the run files' default) takes the checkpoint's recorded config
  with the gin bindings of TransformerConfig (a model gin file, --gin.TransformerConfig.X)
  over it, or without a record, the gin model alone. With `fixed`, a value that
  contradicts the record in a FIXED field is refused (fine-tuning passes False: a new
  model shape is what train.init_assignment_map is for)."""
  return _reconciled(read(checkpoint_path, step), checkpoint_path, given, fixed)


def _reconciled(record: Record | None, checkpoint_path: str,
                given: TransformerConfig | None, fixed: bool) -> TransformerConfig:
  """`model_config` over a record already read."""
  if given is not None:
    if record is not None and fixed:
      _check(record, dataclasses.asdict(given), "the model config")
    return given
  bindings = gin.get_bindings(TransformerConfig)
  if record is None:
    if not bindings:
      raise ValueError(
          f"checkpoint {checkpoint_path!r} records no model ({RECORD}: it was saved before "
          "ul2x wrote one); pass the gin model file it was trained with, e.g. "
          "--gin_file=gin_configs/models/tiny.gin.")
    return TransformerConfig()  # gin fills in the bindings
  if fixed:
    _check(record, bindings, "the gin model")
  return dataclasses.replace(record.config, **bindings)


def job_settings(checkpoint_path: str, model_config: TransformerConfig | None, *,
                 step: int | None = None, **given) -> tuple:
  """(the model, then each of `given` in its order: `task=`, `task_feature_lengths=`) of
  a job over the checkpoint, from one read of its record: the model as `model_config`
  reconciles it; each other setting as given or, where the run file leaves it None, as
  the checkpoint records it."""
  record = read(checkpoint_path, step)
  settings = [_reconciled(record, checkpoint_path, model_config, fixed=True)]
  for name, value in given.items():
    if value is None or value == "":  # an empty MIXTURE_OR_TASK_NAME names no task either
      value = getattr(record, name, None)
      if not value:
        what, macro, example = LEFT_TO_RECORD[name]
        raise ValueError(f"checkpoint {checkpoint_path!r} records no {what}; pass "
                         f"--gin.{macro}=\"{example}\".")
    settings.append(value)
  return tuple(settings)


def _config_bindings(path: str) -> dict:
  """{'name': value} of the top-level bindings and macros in a gin file as training writes
  it (`gin.config_str()`, one per line); a value that is not a Python literal (a
  `%MACRO` or `@reference`, a value spread over lines) is kept as its text."""
  bindings = {}
  with open(path) as f:
    for line in f:
      name, sep, value = line.rstrip("\n").partition(" = ")
      if sep and name and not name[0].isspace() and not name.startswith("#"):
        try:
          bindings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
          bindings[name] = value
  return bindings


def _task_mode_token(task, gin_token: str | None) -> str | None:
  """The mode token that leads `task`'s inputs: fixed by its registration
  (`register_finetune_task(..., mode_token=)`, a UL2 denoiser's `paradigm_token`) or,
  for a bare `prepend_mode_token`, `gin_token`, the one training chose in gin."""
  from ul2x.tasks import preprocessors  # seqio: only where a task is at hand
  for fn in task.preprocessors:
    if fn is preprocessors.prepend_mode_token:
      return gin_token
    keywords = getattr(fn, "keywords", {})
    token = keywords.get("mode_token") or keywords.get("paradigm_token")
    if token:
      return token
  return None


def task_mode_tokens(provider, gin_token: str | None) -> set:
  """The mode tokens that lead the inputs of a task or a mixture's tasks (None: none)."""
  return {_task_mode_token(t, gin_token) for t in getattr(provider, "tasks", [provider])}


def trained_mode_token(checkpoint_path: str, step: int | None = None) -> str | None:
  """The mode token of the task or mixture the checkpoint was trained on, as its record
  or, for older checkpoints, its MODEL_DIR/config.gin names it, said on the console;
  None if the task had none, or if there is neither file or the task is not registered
  and chose no token in gin."""
  saved = read(checkpoint_path, step)
  if saved is not None:
    if not saved.task:
      return None
    return _said_mode_token(saved.task, set(saved.mode_tokens) or {None})
  config = os.path.join(model_dir_of(checkpoint_path, step), "config.gin")
  if not os.path.isfile(config):
    return None
  bindings = _config_bindings(config)
  name = bindings.get("train.mixture_or_task_name")
  if isinstance(name, str) and name.startswith("%"):
    name = bindings.get(name[1:])
  if not isinstance(name, str):
    return None
  gin_token = bindings.get("prepend_mode_token.mode_token")
  from ul2x.tasks import pipeline  # seqio: only for a checkpoint saved without a record
  try:
    provider = pipeline.mixture_or_task(name)
  except ValueError:
    if gin_token is None:
      return None
    raise ValueError(
        f"the checkpoint was trained on {name!r} with prepend_mode_token.mode_token="
        f"{gin_token!r} ({config}), but {name!r} is not registered here; add the gin file "
        f"that imports the module registering it, or pass --gin.infer.mode_token=\"'{gin_token}'\" "
        "(or =None for no mode token).") from None
  return _said_mode_token(name, task_mode_tokens(provider, gin_token))


def _said_mode_token(name: str, tokens: set) -> str | None:
  if tokens == {None}:
    return None
  if len(tokens) > 1:
    say(f"infer: {name!r}, which the checkpoint was trained on, leads its inputs with "
        f"{', '.join(sorted(t or 'none' for t in tokens))}; prompts get no mode token unless "
        "--gin.infer.mode_token names one")
    return None
  token, = tokens
  say(f"infer: prompts get the mode token {token!r} of {name!r}, which the checkpoint was "
      "trained on; pass --gin.infer.mode_token=... (None for none) to change it")
  return token
