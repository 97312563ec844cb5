"""The trainer's input: per-host, packed, batched int32 features from a seqio task or mixture."""

from collections.abc import Mapping
import contextlib
import functools
import re

import tensorflow as tf

try:  # tf.data runs on the host CPU; TF must not take GPU memory from JAX.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF was initialised before this import: nothing to hide now.
  pass

import seqio  # noqa: E402  (after the GPU is hidden)
import tensorflow.experimental.numpy as tnp  # noqa: E402

from ul2x.model.contract import (  # noqa: E402
    STACK_TOKENS, contract_for, unpacked_segments_positions)


def feature_converter(architecture: str, pack: bool = True,
                      has_inputs: bool = True) -> seqio.FeatureConverter:
  """seqio's converter for `architecture` and a task with or without `inputs`, as
  model/contract.py names it.

  encoder_decoder: EncDec (needs inputs). decoder_only: PrefixLM (inputs a bidirectional
  prefix, loss on targets only) when the task has inputs, else the fully causal LM
  converter (no `decoder_causal_attention`, loss on every token).
  """
  contract = contract_for(architecture)
  name = contract.converter if has_inputs else contract.lm_converter
  if name is None:
    raise ValueError(f"architecture {architecture!r} needs a task with 'inputs'; use "
                     "architecture 'decoder_only' for a targets-only (causal LM) task.")
  return getattr(seqio, name)(pack=pack)


def feature_lengths_for(architecture: str,
                        task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
  """Model feature name -> length, e.g. decoder-only `decoder_target_tokens` = inputs + targets.

  A task without inputs is recognised by `task_feature_lengths` lacking 'inputs'.
  """
  converter = feature_converter(architecture, has_inputs="inputs" in task_feature_lengths)
  return dict(converter.get_model_feature_lengths(dict(task_feature_lengths)))


def mixture_or_task(name: str) -> seqio.DatasetProviderBase:
  """The registered seqio task or mixture `name`; raises listing the registered ones."""
  names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in names:
    raise ValueError(f"unknown seqio task or mixture {name!r}; registered: {', '.join(names)}. "
                     "A task that a module of yours registers needs that module imported: "
                     "put e.g. `import my_tasks` in a gin file given with --gin_file "
                     "(docs/ul2.md).")
  return seqio.get_mixture_or_task(name)


def check_feature_lengths(provider: seqio.DatasetProviderBase,
                          task_feature_lengths: Mapping[str, int]) -> None:
  """Raises unless `task_feature_lengths` names exactly the provider's output features."""
  features = sorted(provider.output_features)
  if sorted(task_feature_lengths) != features:
    example = {k: task_feature_lengths.get(k, 64) for k in features}
    raise ValueError(
        f"task_feature_lengths {dict(task_feature_lengths)} do not match the features "
        f"{features} of {provider.name!r}; give one length per feature, e.g. {example}.")


def tf_reason(error: tf.errors.OpError) -> str:
  """TF's message, first line, without the op wrapping around it:
  '/x/missing.txt; No such file or directory'."""
  line = error.message.splitlines()[0] if error.message else type(error).__name__
  line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
  return re.sub(r"\s*\[Op:\w+\].*$", "", line)


def check_split(task: seqio.Task, split: str) -> None:
  """Raises unless `task` has `split` and, for a file source (`seqio.FileDataSource`:
  TextLineDataSource, TFExampleDataSource, ...), each of the split's file patterns
  matches a file. Otherwise a missing file stops the job at its first read."""
  if split not in task.splits:
    raise ValueError(f"task {task.name!r} has no split {split!r}; its splits are "
                     f"{sorted(task.splits)}: add it to the source or pick another split.")
  if not isinstance(task.source, seqio.FileDataSource):
    return
  patterns = task.source._split_to_filepattern[split]  # seqio keeps them only there
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    where = f"task {task.name!r} split {split!r} reads {pattern!r}"
    try:
      found = tf.io.gfile.glob(pattern)
    except tf.errors.OpError as e:
      raise ValueError(f"{where}, which cannot be listed ({tf_reason(e)}); check the path "
                       "in the task's data source.") from None
    if not found:
      raise ValueError(f"{where}, which matches no file; check the path in the task's "
                       "data source.")


@contextlib.contextmanager
def reading(task: seqio.Task, split: str):
  """Turns TF's NotFoundError while reading `task`'s `split` (a file gone since
  `check_split`, a broken link) into one line naming the task."""
  try:
    yield
  except tf.errors.NotFoundError as e:
    raise ValueError(f"task {task.name!r} split {split!r} cannot read its data "
                     f"({tf_reason(e)}); check the path in the task's data source.") from None


def _with_segment_ids(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Adds the packed layout's `*_segment_ids` and `*_positions` to an unpacked batch
  (model/contract.py's `unpacked_segments_positions`), so the model sees the same
  features either way. [batch, len]."""
  batch = dict(batch)
  for stack, tokens in STACK_TOKENS.items():
    if tokens in batch:
      batch[f"{stack}_segment_ids"], batch[f"{stack}_positions"] = (
          unpacked_segments_positions(batch[tokens], tnp))
  return batch


def _count_examples(dataset: tf.data.Dataset, limit: int = 1_000_000) -> int:
  return int(dataset.take(limit).reduce(0, lambda count, _: count + 1))


@functools.lru_cache(maxsize=256)
def _check_task_not_empty(task: seqio.Task, task_feature_lengths: tuple[tuple[str, int], ...],
                          split: str, shard_index: int, num_shards: int) -> None:
  """Raises if `task` lacks `split` or its files, or yields no example in this shard
  (checked once per process)."""
  check_split(task, split)
  lengths = dict(task_feature_lengths)
  with reading(task, split):
    probe = task.get_dataset(lengths, split=split, use_cached=False, shuffle=False,
                             shard_info=seqio.ShardInfo(shard_index, num_shards), num_epochs=1)
    if any(True for _ in probe.take(1)):
      return
  where = f"task {task.name!r} split {split!r} shard {shard_index} of {num_shards}"
  num_source = _count_examples(task.source.get_dataset(split=split, shuffle=False))
  if num_source == 0:
    raise ValueError(f"{where} yields no examples: its source {task.source} is empty; "
                     "check the data files, the split, or the source function.")
  raise ValueError(
      f"{where} yields no examples: its source's {num_source} examples hold fewer tokens "
      f"than one example needs at task_feature_lengths {lengths}; add data, lower "
      "task_feature_lengths, or use fewer shards.")


def _check_not_empty(provider: seqio.DatasetProviderBase, task_feature_lengths: Mapping[str, int],
                     split: str, shard_info: seqio.ShardInfo) -> None:
  """Raises if a task (each member of a mixture) yields no example in this shard.

  A repeated empty pipeline would hang the trainer; one that cycles a corpus shorter
  than one example would silently repeat it inside every example.
  """
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    _check_task_not_empty(task, tuple(sorted(task_feature_lengths.items())), split,
                          shard_info.index, shard_info.num_shards)


def get_dataset(mixture_or_task_name: str, task_feature_lengths: dict[str, int], split: str,
                batch_size: int, *, architecture: str = "encoder_decoder", pack: bool = True,
                seed: int | None = 0, shard_index: int = 0, num_shards: int = 1,
                repeat: bool = True) -> tf.data.Dataset:
  """This host's batches of model features, each int32 [batch_size, model length].

  Encoder-decoder: `encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights, encoder_segment_ids, decoder_segment_ids, encoder_positions,
  decoder_positions`; decoder-only: the `decoder_*` ones, plus `decoder_causal_attention`
  when the task has inputs (a targets-only task is a fully causal LM).
  Lengths are `feature_lengths_for(architecture, task_feature_lengths)`. Unpacked
  batches get segment ids (1 on tokens, 0 on padding) and positions too.

  `batch_size` is this host's batch. Examples are sharded `shard_index` of `num_shards`
  before packing. The same `seed` gives the same batches on the returned dataset's
  first pass (iterating it again reshuffles, as tf.data does); `seed=None` shuffles and
  corrupts differently on every call. `repeat=True` cycles forever. Raises before
  building if any task (each member of a mixture) would yield no example here.
  """
  provider = mixture_or_task(mixture_or_task_name)
  check_feature_lengths(provider, task_feature_lengths)
  converter = feature_converter(architecture, pack, has_inputs="inputs" in task_feature_lengths)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} is not in [0, num_shards={num_shards}).")
  if batch_size < 1:
    raise ValueError(f"batch_size {batch_size} must be at least 1.")
  shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  _check_not_empty(provider, task_feature_lengths, split, shard_info)
  ds = seqio.get_dataset(
      provider, task_feature_lengths, converter, dataset_split=split, use_cached=False,
      shuffle=True, num_epochs=None if repeat else 1, shard_info=shard_info, seed=seed,
      batch_size=batch_size)
  if not pack:
    ds = ds.map(_with_segment_ids, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
