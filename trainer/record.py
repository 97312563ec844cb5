"""What a checkpoint is: MODEL_DIR/ul2x_model.json records the model config, the
vocabulary (its SentencePiece file copied beside it), the task, its mode tokens and
feature lengths, so that infer, eval, export and fine-tuning need only the checkpoint's
path; `model_config` reconciles the record with a gin model, if one is given."""

import dataclasses
import json
import os
import shutil

import gin

from ul2x.model import TransformerConfig
from ul2x.trainer import checkpoints

RECORD = "ul2x_model.json"
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
  """The MODEL_DIR of a checkpoint path (a MODEL_DIR, its checkpoints/ or checkpoints/N)."""
  directory, _ = checkpoints.find_checkpoint(checkpoint_path, step)
  return os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory


def read(checkpoint_path: str, step: int | None = None) -> Record | None:
  """The record of the checkpoint at `checkpoint_path`, or None for a checkpoint saved
  without one (before records were written)."""
  path = os.path.join(model_dir_of(checkpoint_path, step), RECORD)
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
  record = read(checkpoint_path, step)
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


def task(checkpoint_path: str, given: str | None, flag: str = "MIXTURE_OR_TASK_NAME") -> str:
  """`given`, or by default the task or mixture the checkpoint was trained on."""
  if given:
    return given
  record = read(checkpoint_path)
  if record is None or not record.task:
    raise ValueError(f"checkpoint {checkpoint_path!r} records no task; pass "
                     f"--gin.{flag}=\"'my_task'\".")
  return record.task


def task_feature_lengths(checkpoint_path: str, given: dict | None,
                         flag: str = "TASK_FEATURE_LENGTHS") -> dict:
  """`given`, or by default the feature lengths the checkpoint was trained with."""
  if given is not None:
    return given
  record = read(checkpoint_path)
  if record is None or not record.task_feature_lengths:
    raise ValueError(f"checkpoint {checkpoint_path!r} records no feature lengths; pass "
                     f"--gin.{flag}=\"{{'inputs': 128, 'targets': 64}}\".")
  return record.task_feature_lengths
